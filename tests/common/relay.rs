//! A loopback TCP relay between a proxy and ejabberd that can cut the link
//! without a FIN: [`Relay::freeze`] stops forwarding on every connection
//! open at that moment (what either side writes sits unread, as on a dead
//! network path), while connections made afterwards are relayed normally
//! (the network came back). [`Relay::drop_frozen`] then closes the frozen
//! connections: the server sees the end its TCP stack would eventually
//! report; the proxy has usually given up on them long before.
#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Relay {
    pub port: u16,
    state: tokio::sync::watch::Sender<u64>,
    _rt: tokio::runtime::Runtime,
}

/// Even generation: forwarding; odd: connections opened before it are frozen.
impl Relay {
    pub fn start(upstream: SocketAddr) -> Relay {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (state, _) = tokio::sync::watch::channel(0u64);
        let tx = state.clone();
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = server.set_nodelay(true);
                let _ = client.set_nodelay(true);
                let mut st = tx.subscribe();
                st.borrow_and_update();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let (mut b1, mut b2) = (vec![0u8; 16384], vec![0u8; 16384]);
                    loop {
                        tokio::select! {
                            r = cr.read(&mut b1) => match r {
                                Ok(n) if n > 0 => if sw.write_all(&b1[..n]).await.is_err() { break },
                                _ => break,
                            },
                            r = sr.read(&mut b2) => match r {
                                Ok(n) if n > 0 => if cw.write_all(&b2[..n]).await.is_err() { break },
                                _ => break,
                            },
                            c = st.changed() => {
                                if c.is_err() { break }
                                if *st.borrow() % 2 == 1 {
                                    // Frozen until the next change, then dropped.
                                    let _ = st.changed().await;
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        Relay {
            port,
            state,
            _rt: rt,
        }
    }

    /// Stop forwarding on every connection open now (no FIN, no RST).
    pub fn freeze(&self) {
        self.state.send_modify(|g| {
            if *g % 2 == 0 {
                *g += 1
            }
        });
    }

    /// Close the frozen connections (the server sees the link end).
    pub fn drop_frozen(&self) {
        self.state.send_modify(|g| {
            if *g % 2 == 1 {
                *g += 1
            }
        });
    }
}
