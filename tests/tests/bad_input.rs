//! Requests the agent must refuse. Each gets an `error:` message that names what is wrong, a
//! non-zero exit, and changes nothing: networks, endpoints, the pinned endpoint map, the test's
//! namespaces, the host's interfaces and routes are compared before and after
//! ([`net_tests::Agent::assert_refused`]).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use net_tests::{
    EndpointExt, Topology,
    agent::run_agent_once,
    api::Reply,
    exec_in_ok,
    netns::{add_netns, link, list_netns, netns_path},
};

#[test]
fn network_create_refuses_bad_subnets_names_and_mtus() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);

    let create = |name: &str, subnet: &str, extra: &[&str], mentions: &[&str]| {
        let mut args = vec!["network", "create", name, "--subnet", subnet];
        args.extend_from_slice(extra);
        agent.assert_refused(&args, mentions);
    };
    // Invalid CIDRs.
    for bad in [
        "10.1.0.0/33",
        "10.1.0.0",
        "300.1.0.0/24",
        "not-a-cidr",
        "10.1.0.0/x",
        "",
    ] {
        create("green", bad, &[], &["subnet", bad]);
    }
    // Host bits set: the message says which network was meant.
    create("green", "10.1.0.5/24", &[], &["10.1.0.5/24", "10.1.0.0/24"]);
    // Too small to hold an endpoint.
    create("green", "10.1.0.0/31", &[], &["10.1.0.0/31"]);

    // Overlapping an existing network, inside it and around it.
    create(
        "green",
        "10.10.0.128/25",
        &[],
        &["overlap", "blue", "10.10.0.128/25"],
    );
    create(
        "green",
        "10.0.0.0/8",
        &[],
        &["overlap", "blue", "10.0.0.0/8"],
    );
    create("green", "10.10.0.0/24", &[], &["overlap", "blue"]);

    // Duplicate name.
    create("blue", "10.99.0.0/24", &[], &["blue", "exists"]);

    // Bad gateways.
    create(
        "green",
        "10.50.0.0/24",
        &["--gateway", "10.51.0.1"],
        &["10.51.0.1", "outside"],
    );
    create(
        "green",
        "10.50.0.0/24",
        &["--gateway", "10.50.0.0"],
        &["10.50.0.0", "network"],
    );
    create(
        "green",
        "10.50.0.0/24",
        &["--gateway", "10.50.0.255"],
        &["10.50.0.255", "broadcast"],
    );
    create(
        "green",
        "10.50.0.0/24",
        &["--gateway", "banana"],
        &["banana"],
    );

    // MTUs.
    for mtu in ["10", "67", "65536", "0"] {
        create("green", "10.50.0.0/24", &["--mtu", mtu], &["mtu", mtu]);
    }

    // Inter-endpoint traffic is a bridge network's choice.
    create(
        "green",
        "10.50.0.0/24",
        &["--driver", "overlay", "--no-icc"],
        &["--no-icc", "bridge networks only"],
    );
    // So is being internal: an overlay network reaches other hosts.
    create(
        "green",
        "10.50.0.0/24",
        &["--driver", "overlay", "--internal"],
        &["--internal", "bridge networks only"],
    );

    // Names.
    for name in ["a/b", "../etc", "", "-dash", "x y", &"n".repeat(64)] {
        create(name, "10.50.0.0/24", &[], &["name"]);
    }

    // After all that, the valid request works (nothing was half-made).
    let green = agent.network_create("green", "10.50.0.0/24", &["--mtu", "1400"]);
    assert_eq!(green.mtu, 1400);
}

#[test]
fn endpoint_create_refuses_bad_addresses_names_and_networks() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let web = agent.endpoint_create("web", "blue", &[]);

    let create = |name: &str, network: &str, extra: &[&str], mentions: &[&str]| {
        let mut args = vec!["endpoint", "create", name, "--network", network];
        args.extend_from_slice(extra);
        agent.assert_refused(&args, mentions);
    };
    // Duplicate endpoint name (on the same and on another network).
    create("web", "blue", &[], &["web", "exists"]);
    agent.network_create("red", "10.20.0.0/24", &[]);
    create("web", "red", &[], &["web", "exists"]);

    // Unknown network.
    create("db", "nope", &[], &["nope", "not found"]);

    // Requested addresses.
    create(
        "db",
        "blue",
        &["--ip", "10.20.0.5"],
        &["10.20.0.5", "outside"],
    );
    let taken = web.ip().to_string();
    create("db", "blue", &["--ip", &taken], &[&taken, "web"]);
    create(
        "db",
        "blue",
        &["--ip", "10.10.0.0"],
        &["10.10.0.0", "network"],
    );
    create(
        "db",
        "blue",
        &["--ip", "10.10.0.1"],
        &["10.10.0.1", "gateway"],
    );
    create(
        "db",
        "blue",
        &["--ip", "10.10.0.255"],
        &["10.10.0.255", "broadcast"],
    );
    create("db", "blue", &["--ip", "banana"], &["banana"]);
    create("db", "blue", &["--ip", "10.10.0.300"], &["10.10.0.300"]);

    // Names that cannot be part of a namespace path.
    for name in ["x/y", "../evil", "", ".hidden", "a b", &"n".repeat(64)] {
        create(name, "blue", &[], &["name"]);
    }

    // Adoption of a namespace that does not exist, or that another endpoint already uses.
    let missing = netns_path(&topo.netns_name("missing"))
        .display()
        .to_string();
    create("db", "blue", &["--netns", &missing], &[&missing]);
    let shared = topo.netns_name("shared");
    add_netns(&shared);
    let shared_path = netns_path(&shared).display().to_string();
    agent.endpoint_create("first", "blue", &["--netns", &shared_path]);
    create(
        "db",
        "blue",
        &["--netns", &shared_path],
        &[&shared_path, "first"],
    );

    // After all that, a valid request works.
    let db = agent.endpoint_create("db", "blue", &[]);
    assert_eq!(db.ip().to_string(), "10.10.0.4");
}

#[test]
fn exhausted_subnet_is_refused() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    // A /30 has network, gateway, one endpoint address and broadcast.
    let tiny = agent.network_create("tiny", "10.60.0.0/30", &[]);
    assert_eq!(tiny.gateway.to_string(), "10.60.0.1");
    let only = agent.endpoint_create("only", "tiny", &[]);
    assert_eq!(only.ip().to_string(), "10.60.0.2");
    agent.assert_refused(
        &["endpoint", "create", "more", "--network", "tiny"],
        &["tiny", "free"],
    );
    agent.assert_refused(
        &[
            "endpoint",
            "create",
            "more",
            "--network",
            "tiny",
            "--ip",
            "10.60.0.3",
        ],
        &["10.60.0.3", "broadcast"],
    );
    // Freeing the address makes room again.
    agent.endpoint_rm("only");
    let again = agent.endpoint_create("more", "tiny", &[]);
    assert_eq!(again.ip().to_string(), "10.60.0.2");
}

#[test]
fn unknown_names_are_refused() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    agent.endpoint_create("web", "blue", &[]);
    for verb in ["inspect", "rm", "stats"] {
        agent.assert_refused(&["endpoint", verb, "ghost"], &["ghost", "not found"]);
    }
    for verb in ["inspect", "rm"] {
        agent.assert_refused(&["network", verb, "ghost"], &["ghost", "not found"]);
    }
}

#[test]
fn network_with_endpoints_cannot_be_removed() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    agent.endpoint_create("web", "blue", &[]);
    agent.endpoint_create("db", "blue", &[]);
    agent.assert_refused(&["network", "rm", "blue"], &["blue", "web", "db"]);
    agent.endpoint_rm("web");
    agent.assert_refused(&["network", "rm", "blue"], &["blue", "db"]);
    agent.endpoint_rm("db");
    agent.netctl_ok(&["network", "rm", "blue"]);
    let names: Vec<String> = agent.networks().into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["default"], "only the agent's own network is left");
}

#[test]
fn adopting_something_that_cannot_take_an_endpoint_is_refused() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    let adopt = |path: &str, mentions: &[&str]| {
        agent.assert_refused(
            &[
                "endpoint",
                "create",
                "x",
                "--network",
                "blue",
                "--netns",
                path,
            ],
            mentions,
        );
    };

    // Not namespaces: a regular file, a directory, a relative name.
    let file = topo.dir().join("not-a-netns");
    std::fs::write(&file, "").expect("writing a plain file");
    let file = file.display().to_string();
    adopt(&file, &[&file]);
    let dir = topo.dir().display().to_string();
    adopt(&dir, &[&dir]);

    // A namespace that already has an eth0: refused, and its eth0 left as it was.
    let busy = topo.netns_name("busy");
    add_netns(&busy);
    exec_in_ok(
        &busy,
        &[
            "ip",
            "link",
            "add",
            "name",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0-peer",
        ],
    );
    exec_in_ok(
        &busy,
        &["ip", "link", "set", "eth0", "address", "02:00:00:00:00:42"],
    );
    let busy_path = netns_path(&busy).display().to_string();
    adopt(&busy_path, &["eth0"]);
    assert_eq!(
        link(&busy, "eth0").mac,
        "02:00:00:00:00:42",
        "the refused adoption touched the namespace's own eth0"
    );
}

#[test]
fn agent_refuses_bad_command_lines() {
    let topo = Topology::new(1);
    let host = topo.host(1);
    let dir = host.dir().join("bad-args");
    let state = dir.join("state").display().to_string();
    let socket = dir.join("agent.sock").display().to_string();
    let pins = host.bpffs_dir().display().to_string();
    let run = |prefix: &str, bpffs: &str| {
        run_agent_once(
            host,
            &[
                "--state-dir",
                &state,
                "--bpffs-dir",
                bpffs,
                "--socket",
                &socket,
                "--name-prefix",
                prefix,
            ],
        )
    };
    for prefix in ["UPPER", "waytoolong", "a-b", "", "a/b", "a b"] {
        let out = run(prefix, &pins);
        assert!(
            !out.success(),
            "the agent accepted --name-prefix {prefix:?}\n{out}"
        );
        assert!(
            out.stderr.to_lowercase().contains("prefix"),
            "the agent's error should name the prefix\n{out}"
        );
    }
    // Pins must go to a bpffs.
    let not_bpffs = dir.join("pins").display().to_string();
    let out = run(&host.agent_prefix(), &not_bpffs);
    assert!(!out.success(), "the agent pinned outside bpffs\n{out}");
    assert!(
        out.stderr.contains(&not_bpffs),
        "the agent's error should name the bpffs directory\n{out}"
    );
    // Nothing was left behind by the refused starts.
    assert!(
        !Path::new(&pins).exists(),
        "a refused agent created its pin directory {pins}"
    );
    assert!(
        list_netns(&host.agent_prefix()).is_empty(),
        "a refused agent made namespaces"
    );
}

#[test]
fn a_second_agent_on_the_same_socket_is_refused() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    agent.network_create("blue", "10.10.0.0/24", &[]);
    agent.endpoint_create("web", "blue", &[]);
    let before = agent.snapshot();
    let out = agent.run_duplicate();
    assert!(
        !out.success(),
        "a second agent started on the same socket\n{out}"
    );
    let socket = agent.socket().display().to_string();
    assert!(
        out.stderr.contains(&socket),
        "the second agent's error should name the socket\n{out}"
    );
    assert_eq!(
        agent.snapshot(),
        before,
        "the refused second agent changed state"
    );
    agent.endpoint_create("db", "blue", &[]);
}

/// Sends one raw line to the agent's socket and reads the reply line.
fn raw_request(socket: &Path, line: &[u8]) -> Reply {
    let mut conn = UnixStream::connect(socket).expect("connecting to the agent socket");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("setting a read timeout");
    conn.write_all(line).expect("sending a raw request");
    let mut reply = String::new();
    BufReader::new(&conn)
        .read_line(&mut reply)
        .expect("reading the agent's reply");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("the reply {reply:?} is not JSON: {e}"))
}

#[test]
fn malformed_and_stalled_api_clients_are_harmless() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    // A client that starts a request and never finishes it ...
    let mut stalled = UnixStream::connect(agent.socket()).expect("connecting to the agent socket");
    stalled
        .write_all(b"{\"op\":")
        .expect("sending half a request");
    // ... while others send garbage and get an error each ...
    for line in [
        &b"this is not json\n"[..],
        b"{\"op\":\"explode\"}\n",
        b"{\"op\":\"network_create\",\"name\":\"x\"}\n",
        b"[]\n",
    ] {
        let reply = raw_request(agent.socket(), line);
        assert!(
            reply.ok.is_none() && reply.error.as_deref().is_some_and(|e| !e.is_empty()),
            "request {:?} should get an error reply, got {reply:?}",
            String::from_utf8_lossy(line)
        );
    }
    // ... and normal work goes on.
    agent.network_create("blue", "10.10.0.0/24", &[]);
    agent.endpoint_create("web", "blue", &[]);
    assert_eq!(agent.status().endpoints, 1);
    drop(stalled);
    let names: Vec<String> = agent.networks().into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["blue", "default"]);
}

#[test]
fn netctl_bpf_names_a_pin_directory_that_holds_no_data_plane() {
    let topo = Topology::new(1);
    let agent = topo.host(1).start_agent();
    let wrong = format!("{}-nothing", agent.bpffs_dir().display());
    let out = agent
        .netctl_handle()
        .with_bpffs_dir(&wrong)
        .run(&["bpf", "endpoints", "list"]);
    assert!(
        !out.success(),
        "netctl read a data plane from {wrong}\n{out}"
    );
    assert!(
        out.stderr.trim_start().starts_with("error:") && out.stderr.contains(&wrong),
        "netctl's error should start with `error:` and name {wrong}\n{out}"
    );
}
