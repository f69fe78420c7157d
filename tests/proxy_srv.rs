//! Upstream resolution without `--upstream` (RFC 6120 §3.2): the proxy
//! asks the configured DNS server (`dns_server`) for
//! `_xmpp-client._tcp.DOMAIN`, tries the targets by priority then weight,
//! and falls back to `DOMAIN:5222`.
//!
//! A tiny loopback UDP DNS responder (answers built with hickory-proto)
//! serves fixed zones; fake upstreams are plain loopback listeners that
//! record the stream header the proxy sends them. A client opens a stream
//! to the proxy (plaintext client leg on loopback) for the domain, which
//! makes the proxy resolve and connect.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use o2tr_proxy::proxy::{self, ProxyConfig};

/// Answers by (name, type); a name absent from every key gets NXDOMAIN.
/// Every question asked is recorded.
struct Dns {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<(String, RecordType)>>>,
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn srv(owner: &str, priority: u16, weight: u16, port: u16, target: &str) -> Record {
    Record::from_rdata(
        name(owner),
        60,
        RData::SRV(SRV::new(priority, weight, port, name(target))),
    )
}

fn a(owner: &str, ip: Ipv4Addr) -> Record {
    Record::from_rdata(name(owner), 60, RData::A(A(ip)))
}

impl Dns {
    fn start(records: Vec<Record>) -> Dns {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&asked);
        let mut zone: HashMap<(String, RecordType), Vec<Record>> = HashMap::new();
        for r in records {
            let key = (r.name().to_ascii().to_lowercase(), r.record_type());
            zone.entry(key).or_default().push(r);
        }
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            // Ends with the test process.
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut resp = Message::new();
                resp.set_id(req.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(req.op_code())
                    .set_recursion_desired(req.recursion_desired())
                    .set_recursion_available(true)
                    .set_authoritative(true);
                for q in req.queries() {
                    let qname = q.name().to_ascii().to_lowercase();
                    log.lock().unwrap().push((qname.clone(), q.query_type()));
                    resp.add_query(q.clone());
                    match zone.get(&(qname.clone(), q.query_type())) {
                        Some(rs) => {
                            resp.add_answers(rs.iter().cloned());
                        }
                        None if zone.keys().any(|(n, _)| *n == qname) => {} // NODATA
                        None => {
                            resp.set_response_code(ResponseCode::NXDomain);
                        }
                    }
                }
                if let Ok(bytes) = resp.to_vec() {
                    let _ = sock.send_to(&bytes, from);
                }
            }
        });
        Dns { addr, asked }
    }

    fn asked(&self, qname: &str, t: RecordType) -> bool {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .any(|(n, rt)| n == qname && *rt == t)
    }
}

/// A fake upstream: accepts one connection and returns what it read
/// until the proxy's stream header was complete.
struct Upstream {
    port: u16,
    got: std::sync::mpsc::Receiver<String>,
}

fn upstream_on(listener: TcpListener) -> Upstream {
    let port = listener.local_addr().unwrap().port();
    let (tx, got) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut text = String::new();
            let mut buf = [0u8; 1024];
            while !text.contains("<stream:stream") || !text.ends_with('>') {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
            let _ = tx.send(text);
        }
    });
    Upstream { port, got }
}

fn upstream() -> Upstream {
    upstream_on(TcpListener::bind("127.0.0.1:0").unwrap())
}

impl Upstream {
    /// The header the proxy sent, if it connected here within `wait`.
    fn header(&self, wait: Duration) -> Option<String> {
        self.got.recv_timeout(wait).ok()
    }
}

/// A loopback port nobody listens on.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Starts a proxy resolving through `dns`, opens a client stream for
/// `domain`, and keeps both alive until the returned guard is dropped.
struct Run {
    _rt: tokio::runtime::Runtime,
    _client: TcpStream,
}

fn run_proxy(dns: &Dns, domain: &str) -> Run {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = ProxyConfig::new();
    cfg.listen = addr;
    cfg.allow_plaintext_client = true;
    cfg.dns_server = Some(dns.addr);
    rt.spawn(async move {
        let _ = proxy::serve(listener, cfg, std::future::pending::<()>()).await;
    });
    let mut client = TcpStream::connect(addr).unwrap();
    write!(
        client,
        "<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    )
    .unwrap();
    Run {
        _rt: rt,
        _client: client,
    }
}

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn srv_target_is_used() {
    let up = upstream();
    let dns = Dns::start(vec![
        srv(
            "_xmpp-client._tcp.one.test.",
            10,
            0,
            up.port,
            "xmpp1.one.test.",
        ),
        a("xmpp1.one.test.", Ipv4Addr::LOCALHOST),
    ]);
    let _run = run_proxy(&dns, "one.test");
    let header = up
        .header(WAIT)
        .expect("the proxy never reached the SRV target");
    assert!(
        header.contains("to='one.test'") || header.contains("to=\"one.test\""),
        "{header}"
    );
    assert!(dns.asked("_xmpp-client._tcp.one.test.", RecordType::SRV));
    assert!(
        dns.asked("xmpp1.one.test.", RecordType::A),
        "target resolved by the configured server"
    );
}

#[test]
fn without_srv_the_domain_on_5222_is_tried() {
    // Port 5222 on a loopback address of its own, when it can be had.
    let ip = Ipv4Addr::new(127, 0, 83, 22);
    let fallback = TcpListener::bind((ip, 5222)).ok().map(upstream_on);
    let dns = Dns::start(vec![a("nosrv.test.", ip)]);
    let _run = run_proxy(&dns, "nosrv.test");
    if let Some(up) = &fallback {
        let header = up.header(WAIT).expect("no connection to DOMAIN:5222");
        assert!(header.contains("nosrv.test"), "{header}");
    } else {
        let deadline = std::time::Instant::now() + WAIT;
        while !dns.asked("nosrv.test.", RecordType::A) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(dns.asked("_xmpp-client._tcp.nosrv.test.", RecordType::SRV));
    assert!(
        dns.asked("nosrv.test.", RecordType::A),
        "the domain itself was not looked up"
    );
}

#[test]
fn srv_records_are_tried_by_priority_then_weight() {
    let best = upstream();
    let light = upstream();
    let worse = upstream();
    let dead = closed_port();
    let dns = Dns::start(vec![
        srv(
            "_xmpp-client._tcp.many.test.",
            20,
            100,
            worse.port,
            "c.many.test.",
        ),
        srv(
            "_xmpp-client._tcp.many.test.",
            10,
            1,
            light.port,
            "b.many.test.",
        ),
        srv(
            "_xmpp-client._tcp.many.test.",
            10,
            90,
            best.port,
            "a.many.test.",
        ),
        // The most preferred target refuses: the proxy moves on.
        srv(
            "_xmpp-client._tcp.many.test.",
            5,
            0,
            dead,
            "dead.many.test.",
        ),
        a("a.many.test.", Ipv4Addr::LOCALHOST),
        a("b.many.test.", Ipv4Addr::LOCALHOST),
        a("c.many.test.", Ipv4Addr::LOCALHOST),
        a("dead.many.test.", Ipv4Addr::LOCALHOST),
    ]);
    let _run = run_proxy(&dns, "many.test");
    let header = best
        .header(WAIT)
        .expect("the priority 10, weight 90 target was not used");
    assert!(header.contains("many.test"), "{header}");
    assert!(
        dns.asked("dead.many.test.", RecordType::A),
        "priority 5 not tried first"
    );
    assert!(light.header(Duration::from_millis(300)).is_none());
    assert!(worse.header(Duration::from_millis(300)).is_none());
}
