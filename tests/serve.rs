//! Serving: round trips over every transport, the four built-in plugins per
//! their RFCs, the pool's workers and titles, several services per master.

mod common;

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::Duration;

use common::*;

#[test]
fn echo_over_tcp_udp_unix_and_unixgram() {
    let mut listen = vec![
        "tcp://127.0.0.1:0",
        "udp://127.0.0.1:0",
        "unix:{dir}/echo.sock",
        "unixgram:{dir}/echo.dgram",
    ];
    let v6 = have_ipv6();
    if v6 {
        listen.push("tcp://[::1]:0");
        listen.push("udp://[::1]:0");
    } else {
        eprintln!("skipping the IPv6 cases: [::1] cannot be bound here");
    }
    let d = Daemon::start(&service("echo", &listen, "echo", "workers = 2"));
    d.wait_ready();

    let tcp4 = d.addr("tcp", "echo");
    echo_once(tcp4, b"hello over tcp\n").unwrap();

    let udp4 = d
        .log_text()
        .lines()
        .find(|l| l.contains("listening on udp://127.0.0.1"))
        .map(|l| {
            l[l.find("://").unwrap() + 3..l.rfind(" (service").unwrap()]
                .parse()
                .unwrap()
        })
        .unwrap();
    udp_echo(udp4, "127.0.0.1:0");

    let mut u = UnixStream::connect(d.path("echo.sock")).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    u.write_all(b"hello over unix").unwrap();
    let mut buf = [0u8; 15];
    u.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello over unix");
    drop(u);

    let client = d.path("client.dgram");
    let g = UnixDatagram::bind(&client).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    g.send_to(b"hello over unixgram", d.path("echo.dgram"))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = g.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello over unixgram");

    if v6 {
        let lines = d.log_text();
        let find = |scheme: &str| -> std::net::SocketAddr {
            let l = lines
                .lines()
                .find(|l| l.contains(&format!("listening on {scheme}://[::1]")))
                .unwrap();
            l[l.find("://").unwrap() + 3..l.rfind(" (service").unwrap()]
                .parse()
                .unwrap()
        };
        echo_once(find("tcp"), b"hello over tcp6").unwrap();
        udp_echo(find("udp"), "[::1]:0");
    }
}

fn udp_echo(to: std::net::SocketAddr, from: &str) {
    assert_eq!(udp_ask(to, from, b"hello over udp"), b"hello over udp");
}

#[test]
fn discard_daytime_chargen_per_rfc() {
    let config = [
        service(
            "discard",
            &["tcp://127.0.0.1:0", "udp://127.0.0.1:0"],
            "discard",
            "workers = 1",
        ),
        service(
            "daytime",
            &["tcp://127.0.0.1:0", "udp://127.0.0.1:0"],
            "daytime",
            "workers = 1",
        ),
        service(
            "chargen",
            &["tcp://127.0.0.1:0", "udp://127.0.0.1:0"],
            "chargen",
            "workers = 1",
        ),
    ]
    .join("\n");
    let d = Daemon::start(&config);
    d.wait_ready();

    // discard (RFC 863): nothing comes back; our close gets a clean EOF.
    let mut s = connect(d.addr("tcp", "discard")).unwrap();
    s.write_all(&[7u8; 10_000]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut s).unwrap(), b"");
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    u.send_to(b"into the void", d.addr("udp", "discard"))
        .unwrap();
    assert!(u.recv(&mut [0u8; 16]).is_err(), "discard must not answer");

    // daytime (RFC 867): one line of date, then the server closes.
    let mut s = connect(d.addr("tcp", "daytime")).unwrap();
    let line = String::from_utf8(read_to_eof(&mut s).unwrap()).unwrap();
    assert!(line.ends_with(" GMT\r\n"), "{line:?}");
    assert_eq!(line.lines().count(), 1);
    let year = line
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse::<u32>()
        .unwrap();
    assert!((2024..3000).contains(&year), "{line:?}");
    let reply = String::from_utf8(udp_ask(d.addr("udp", "daytime"), "127.0.0.1:0", b"?")).unwrap();
    assert!(reply.ends_with(" GMT\r\n"), "{reply:?}");

    // chargen (RFC 864): 72-character rotating lines of printable ASCII.
    let mut s = connect(d.addr("tcp", "chargen")).unwrap();
    let mut buf = vec![0u8; 74 * 200];
    s.read_exact(&mut buf).unwrap();
    for (i, line) in buf.chunks(74).enumerate() {
        assert_eq!(&line[72..], b"\r\n");
        for (c, b) in line[..72].iter().enumerate() {
            assert_eq!(*b, b' ' + ((i + c) % 95) as u8, "line {i} col {c}");
        }
    }
    drop(s);
    let reply = udp_ask(d.addr("udp", "chargen"), "127.0.0.1:0", b"?");
    assert!(reply.len() <= 512);
    for (c, b) in reply.iter().enumerate().filter(|(c, _)| c % 74 < 72) {
        assert_eq!(*b, b' ' + ((c / 74 + c % 74) % 95) as u8);
    }
    // The chargen worker outlived its client going away mid-stream (SIGPIPE
    // is ignored, EPIPE ends the handler) and serves the next client.
    let mut s = connect(d.addr("tcp", "chargen")).unwrap();
    let mut line = [0u8; 74];
    s.read_exact(&mut line).unwrap();
    assert_eq!(&line[72..], b"\r\n");
    drop(s);
    let log = d.log_text();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("worker chargen#0") && l.ends_with("spawned"))
            .count(),
        1,
        "the chargen worker was replaced:\n{log}"
    );
    assert!(!log.contains("killed by signal"), "{log}");
}

#[test]
fn pool_size_and_titles_and_two_services() {
    let config = [
        service("alpha", &["tcp://127.0.0.1:0"], "echo", "workers = 3"),
        service(
            "beta",
            &["unix:{dir}/beta.sock"],
            "echo",
            "workers = 2\nthreads = 4",
        ),
    ]
    .join("\n");
    let d = Daemon::start(&config);
    d.wait_ready();
    let workers = d.wait_workers(5);
    assert_eq!(title(d.pid()), "preforkd: master");
    let mut titles: Vec<String> = workers.iter().map(|p| title(*p)).collect();
    titles.sort();
    assert_eq!(
        titles,
        [
            "preforkd: worker alpha#0 gen 1",
            "preforkd: worker alpha#1 gen 1",
            "preforkd: worker alpha#2 gen 1",
            "preforkd: worker beta#0 gen 1",
            "preforkd: worker beta#1 gen 1",
        ]
    );
    // threads = 4: each beta worker serves four connections at once.
    let conns: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(d.path("beta.sock")).unwrap())
        .collect();
    for (i, mut c) in conns.iter().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let msg = format!("conn {i}\n");
        c.write_all(msg.as_bytes()).unwrap();
        let mut buf = vec![0u8; msg.len()];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg.as_bytes());
    }
    echo_once(d.addr("tcp", "alpha"), b"alpha").unwrap();
}
