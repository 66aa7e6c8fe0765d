//! Engine.IO's long polling, and the upgrade from it to a websocket.
//!
//! A polling session is a [`Transport`] like a websocket, so a socket runs the same loop on
//! either. Its packets wait in two queues: the client's (`POST`, up to [`PENDING_PACKETS`], the
//! request waits for room) and the server's (up to `SOCKETIO_BUFFER`, taken whole by the next
//! `GET`; the loop waits for room, and a reply's chunks merge in the connection's queue
//! meanwhile). When the client upgrades, the same transport carries on over the websocket,
//! starting with whatever the last `GET` did not take.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::{CancellationToken, PollSender, WaitForCancellationFutureOwned};

use super::super::ws::Socket;
use super::EngineError;

/// Client packets one session may have waiting to be handled; a `POST` with more waits.
const PENDING_PACKETS: usize = 32;
/// How long a client may take from opening a websocket to completing the upgrade on it.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after a probe the `GET` waiting gets a noop, unless the client has upgraded by then.
const NOOP_DELAY: Duration = Duration::from_millis(100);
/// Separates the packets of a polling payload.
const SEPARATOR: char = '\u{1e}';
/// Engine.IO's close packet, the server's last to a polling client.
const CLOSE: &str = "1";
/// Engine.IO's noop, which ends a `GET` that has nothing to carry.
const NOOP: &str = "6";

/// The open polling sessions, by id, and the ids of those upgraded to a websocket since.
#[derive(Default)]
pub struct Sessions(Mutex<Registry>);

#[derive(Default)]
struct Registry {
    polling: HashMap<Arc<str>, Arc<Polling>>,
    upgraded: HashSet<Arc<str>>,
}

/// What a session id names.
pub enum Known {
    Polling(Arc<Polling>),
    /// A session now on a websocket.
    Upgraded,
}

impl Sessions {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, sid: &str) -> Option<Known> {
        let registry = self.registry();
        match registry.polling.get(sid) {
            Some(polling) => Some(Known::Polling(polling.clone())),
            None => registry.upgraded.contains(sid).then_some(Known::Upgraded),
        }
    }

    fn remove(&self, polling: &Polling) {
        let mut registry = self.registry();
        if registry
            .polling
            .get(&polling.sid)
            .is_some_and(|p| std::ptr::eq(&**p, polling))
        {
            registry.polling.remove(&polling.sid);
        }
    }

    /// Forgets an upgraded session, once it is over.
    fn forget(&self, sid: &str) {
        self.registry().upgraded.remove(sid);
    }

    /// Moves a session from polling to upgraded.
    fn upgraded(&self, polling: &Polling) {
        self.remove(polling);
        self.registry().upgraded.insert(polling.sid.clone());
    }

    /// Opens a session: its shared half, kept here for the requests, and its transport.
    pub fn open(
        self: &Arc<Self>,
        buffer: usize,
        linger: Duration,
    ) -> (Arc<Polling>, PollingTransport) {
        let sid: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
        let (incoming, packets) = mpsc::channel(PENDING_PACKETS);
        let (outgoing, taken) = mpsc::channel(buffer);
        let (upgrade, upgraded) = oneshot::channel();
        let closed = CancellationToken::new();
        let polling = Arc::new(Polling {
            sid: sid.clone(),
            incoming,
            outgoing: Mutex::new(taken),
            polling: AtomicBool::new(false),
            posting: AtomicBool::new(false),
            noop_due: AtomicBool::new(false),
            moved: AtomicBool::new(false),
            upgrading: Notify::new(),
            overlapped: AtomicBool::new(false),
            goodbye: AtomicBool::new(false),
            upgrade: Mutex::new(Some(upgrade)),
            closed: closed.clone(),
            linger,
        });
        self.registry().polling.insert(sid, polling.clone());
        let end = PollingEnd {
            polling: polling.clone(),
            sessions: self.clone(),
            packets,
            outgoing: PollSender::new(outgoing),
            closed: Box::pin(closed.cancelled_owned()),
            upgraded: Some(upgraded),
            said_goodbye: false,
            moved: false,
        };
        (polling, PollingTransport::Polling(Box::new(end)))
    }
}

/// What the requests of one polling session share with its transport.
pub struct Polling {
    pub sid: Arc<str>,
    /// The client's packets, for the transport.
    incoming: mpsc::Sender<Message>,
    /// The server's packets, for the next `GET`.
    outgoing: Mutex<mpsc::Receiver<Utf8Bytes>>,
    /// A `GET` is waiting.
    polling: AtomicBool,
    /// A `POST` is being read.
    posting: AtomicBool,
    /// The client probed a websocket and has not upgraded since [`NOOP_DELAY`]: a `GET` gets a
    /// noop at once, so that the client can complete the upgrade.
    noop_due: AtomicBool,
    /// The client upgraded: a `GET` still waiting is refused.
    moved: AtomicBool,
    /// Ends the `GET` waiting when the upgrade needs it to.
    upgrading: Notify,
    /// The client sent two `GET`s or two `POST`s at once.
    overlapped: AtomicBool,
    /// The close packet waits for the next `GET`.
    goodbye: AtomicBool,
    /// Hands the websocket over to the transport once the client upgraded.
    upgrade: Mutex<Option<oneshot::Sender<Box<Socket>>>>,
    /// The session is over.
    closed: CancellationToken,
    /// How long an ended session waits for the client to take its last packets.
    linger: Duration,
}

impl Polling {
    /// Ends the session: the transport's loop ends, and the session's requests are refused.
    pub fn close(&self, sessions: &Sessions) {
        sessions.remove(self);
        self.closed.cancel();
    }

    /// Answers a `GET`: the server's packets waiting, once there are any, joined by the record
    /// separator. A second `GET` at once ends the session; the first then gets the close packet.
    pub async fn poll(&self, sessions: &Sessions, limit: usize) -> Result<Bytes, EngineError> {
        if self.polling.swap(true, Ordering::AcqRel) {
            self.overlapped.store(true, Ordering::Release);
            self.close(sessions);
            return Err(EngineError::BadRequest);
        }
        let _waiting = Flag(&self.polling);
        if self.goodbye.load(Ordering::Acquire) {
            self.close(sessions);
            return Ok(Bytes::from_static(CLOSE.as_bytes()));
        }
        let upgrading = self.upgrading.notified();
        tokio::pin!(upgrading);
        upgrading.as_mut().enable();
        if self.noop_due.load(Ordering::Acquire) {
            return Ok(Bytes::from_static(NOOP.as_bytes()));
        }
        let mut packets = Vec::new();
        let taken = std::future::poll_fn(|cx| {
            let mut outgoing = self.outgoing.lock().unwrap_or_else(PoisonError::into_inner);
            outgoing.poll_recv_many(cx, &mut packets, limit)
        });
        tokio::select! {
            biased;
            _ = taken => {}
            () = self.closed.cancelled() => {}
            () = upgrading => {}
        }
        if self.moved.load(Ordering::Acquire) {
            return Err(EngineError::BadRequest);
        }
        if self.overlapped.load(Ordering::Acquire) {
            return Ok(Bytes::from_static(CLOSE.as_bytes()));
        }
        if packets.len() > 1 && packets.last().is_some_and(|p| p.as_str() == CLOSE) {
            // socket.io-client handles a close packet before the Socket.IO packets of the same
            // payload (those wait a tick): a disconnect before it would read as the transport's
            // close. It gets a payload of its own.
            packets.pop();
            self.goodbye.store(true, Ordering::Release);
        } else if self.closed.is_cancelled() || packets.last().is_some_and(|p| p.as_str() == CLOSE)
        {
            self.close(sessions);
        }
        Ok(join(packets))
    }

    /// Takes a `POST`'s payload: its packets go to the transport in order, and the request waits
    /// while the transport has [`PENDING_PACKETS`] waiting. A close packet ends the session; a
    /// payload that is not Engine.IO's, or a second `POST` at once, ends it too and is refused.
    pub async fn post(
        self: &Arc<Self>,
        sessions: &Arc<Sessions>,
        payload: &[u8],
    ) -> Result<(), EngineError> {
        if self.posting.swap(true, Ordering::AcqRel) {
            self.close(sessions);
            return Err(EngineError::BadRequest);
        }
        let _posting = Flag(&self.posting);
        let Ok(payload) = std::str::from_utf8(payload) else {
            self.close(sessions);
            return Err(EngineError::BadRequest);
        };
        for packet in payload.split(SEPARATOR) {
            match packet.as_bytes().first() {
                Some(b'1') => {
                    self.closed.cancel();
                    self.linger(sessions);
                    return Ok(());
                }
                Some(b'0'..=b'6' | b'b') => {
                    let packet = Message::text(packet);
                    tokio::select! {
                        sent = self.incoming.send(packet) => if sent.is_err() { return Ok(()) },
                        () = self.closed.cancelled() => return Ok(()),
                    }
                }
                _ => {
                    self.close(sessions);
                    return Err(EngineError::BadRequest);
                }
            }
        }
        Ok(())
    }

    /// Keeps an ended session for the client's next `GET`, which takes its last packets (a noop
    /// when none) and ends it, for at most `linger`.
    fn linger(self: &Arc<Self>, sessions: &Arc<Sessions>) {
        let (polling, sessions) = (self.clone(), sessions.clone());
        tokio::spawn(async move {
            tokio::time::sleep(polling.linger).await;
            polling.close(&sessions);
        });
    }

    /// Takes the session's upgrade for a websocket that asks for it; `None` when another has it
    /// already.
    pub fn take_upgrade(&self) -> Option<oneshot::Sender<Box<Socket>>> {
        self.upgrade
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Upgrades the session to `socket`: answers the client's probe and, once the client says
    /// so (`5`), hands the socket to the transport. A `GET` still waiting [`NOOP_DELAY`] after the
    /// probe gets a noop, for a client that waits for it before it upgrades. A client that does
    /// not complete the upgrade in time, or closes the websocket first, stays on polling.
    pub async fn upgrade(
        &self,
        sessions: &Sessions,
        handover: oneshot::Sender<Box<Socket>>,
        mut socket: Box<Socket>,
    ) {
        let upgraded = tokio::time::timeout(UPGRADE_TIMEOUT, async {
            let noop = tokio::time::sleep(UPGRADE_TIMEOUT);
            tokio::pin!(noop);
            let mut probed = false;
            loop {
                let frame = tokio::select! {
                    frame = socket.next() => frame,
                    () = &mut noop, if probed => {
                        self.noop_due.store(true, Ordering::Release);
                        self.upgrading.notify_waiters();
                        noop.as_mut().reset(tokio::time::Instant::now() + UPGRADE_TIMEOUT);
                        continue;
                    }
                };
                let text = match frame {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return false,
                    Some(Ok(_)) => continue,
                };
                match text.as_str() {
                    "2probe" if !probed => {
                        if socket.send(Message::text("3probe")).await.is_err() {
                            return false;
                        }
                        probed = true;
                        noop.as_mut()
                            .reset(tokio::time::Instant::now() + NOOP_DELAY);
                    }
                    "5" if probed => return true,
                    _ => return false,
                }
            }
        });
        let upgraded = upgraded.await.unwrap_or(false);
        self.noop_due.store(false, Ordering::Release);
        if !upgraded {
            self.give_back(handover);
            return;
        }
        sessions.upgraded(self);
        self.moved.store(true, Ordering::Release);
        self.upgrading.notify_waiters();
        if let Err(mut socket) = handover.send(socket) {
            // The session ended meanwhile: its last packets go over the websocket.
            sessions.forget(&self.sid);
            let mut last = futures::stream::iter(self.leftover().into_iter().map(Ok));
            let farewell = async {
                socket.send_all(&mut last).await?;
                socket.close().await
            };
            let _ = tokio::time::timeout(UPGRADE_TIMEOUT, farewell).await;
        }
    }

    /// What the client had not taken by polling when it upgraded, for the websocket. A close
    /// packet among them becomes the websocket's own close.
    fn leftover(&self) -> VecDeque<Message> {
        let mut outgoing = self.outgoing.lock().unwrap_or_else(PoisonError::into_inner);
        outgoing.close();
        let mut leftover = VecDeque::new();
        while let Ok(packet) = outgoing.try_recv() {
            if packet.as_str() != CLOSE {
                leftover.push_back(Message::Text(packet));
            }
        }
        leftover
    }

    /// Gives back an upgrade that did not happen, for the client to try again.
    pub fn give_back(&self, handover: oneshot::Sender<Box<Socket>>) {
        *self.upgrade.lock().unwrap_or_else(PoisonError::into_inner) = Some(handover);
    }
}

/// Clears a flag when a request ends, however it ends.
struct Flag<'a>(&'a AtomicBool);

impl Drop for Flag<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Joins packets into a polling payload; a noop when there are none.
fn join(packets: Vec<Utf8Bytes>) -> Bytes {
    match packets.len() {
        0 => Bytes::from_static(NOOP.as_bytes()),
        1 => packets
            .into_iter()
            .next()
            .map(Bytes::from)
            .unwrap_or_default(),
        _ => {
            let size = packets.iter().map(|p| p.len() + 1).sum();
            let mut payload = BytesMut::with_capacity(size);
            for (i, packet) in packets.iter().enumerate() {
                if i > 0 {
                    payload.extend_from_slice(&[SEPARATOR as u8]);
                }
                payload.extend_from_slice(packet.as_bytes());
            }
            payload.freeze()
        }
    }
}

/// A Socket.IO connection's transport: long polling, until the client upgrades to a websocket.
pub enum PollingTransport {
    Polling(Box<PollingEnd>),
    Upgraded {
        socket: Box<Socket>,
        /// What the client had not taken by polling, sent first.
        leftover: VecDeque<Message>,
        _id: UpgradedId,
    },
}

/// An upgraded session's id, known until the session ends: a websocket that asks to upgrade it
/// again is opened and closed, a polling request refused.
pub struct UpgradedId {
    sessions: Arc<Sessions>,
    sid: Arc<str>,
}

impl Drop for UpgradedId {
    fn drop(&mut self) {
        self.sessions.forget(&self.sid);
    }
}

/// The transport's side of a polling session.
pub struct PollingEnd {
    polling: Arc<Polling>,
    sessions: Arc<Sessions>,
    packets: mpsc::Receiver<Message>,
    outgoing: PollSender<Utf8Bytes>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    upgraded: Option<oneshot::Receiver<Box<Socket>>>,
    /// The close packet went out: the session stays until the client takes it.
    said_goodbye: bool,
    /// The session moved to a websocket.
    moved: bool,
}

impl PollingEnd {
    /// The websocket, once the client has upgraded to it.
    fn poll_upgraded(&mut self, cx: &mut Context<'_>) -> Option<Box<Socket>> {
        let upgraded = self.upgraded.as_mut()?;
        match Pin::new(upgraded).poll(cx) {
            Poll::Ready(Ok(socket)) => Some(socket),
            Poll::Ready(Err(_)) => {
                self.upgraded = None;
                None
            }
            Poll::Pending => None,
        }
    }

    /// Whether the session is over for the transport.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> bool {
        self.said_goodbye || self.closed.as_mut().poll(cx).is_ready()
    }
}

impl Drop for PollingEnd {
    fn drop(&mut self) {
        // Moved to a websocket, or ended by whoever cancelled it.
        if self.moved || self.polling.closed.is_cancelled() {
            return;
        }
        if self.said_goodbye {
            self.polling.linger(&self.sessions);
        } else {
            self.polling.close(&self.sessions);
        }
    }
}

impl PollingTransport {
    /// Moves to the websocket the client upgraded to, with the packets it had not taken.
    fn upgrade(&mut self, socket: Box<Socket>) {
        let PollingTransport::Polling(end) = self else {
            return;
        };
        end.moved = true;
        let leftover = end.polling.leftover();
        let id = UpgradedId {
            sessions: end.sessions.clone(),
            sid: end.polling.sid.clone(),
        };
        *self = PollingTransport::Upgraded {
            socket,
            leftover,
            _id: id,
        };
    }
}

/// Sends the leftover packets before anything else.
fn poll_leftover(
    socket: &mut Socket,
    leftover: &mut VecDeque<Message>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), WsError>> {
    while !leftover.is_empty() {
        ready!(socket.poll_ready_unpin(cx))?;
        if let Some(packet) = leftover.pop_front() {
            socket.start_send_unpin(packet)?;
        }
    }
    Poll::Ready(Ok(()))
}

impl Stream for PollingTransport {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let PollingTransport::Polling(end) = this {
            if let Poll::Ready(Some(packet)) = end.packets.poll_recv(cx) {
                return Poll::Ready(Some(Ok(packet)));
            }
            if end.poll_closed(cx) {
                return Poll::Ready(None);
            }
            match end.poll_upgraded(cx) {
                Some(socket) => this.upgrade(socket),
                None => return Poll::Pending,
            }
        }
        match this {
            PollingTransport::Upgraded {
                socket, leftover, ..
            } => {
                // What the client had not taken goes out now, not with the next event.
                if !leftover.is_empty() {
                    match poll_leftover(socket, leftover, cx) {
                        Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                        // A failed flush shows on the next read.
                        Poll::Ready(Ok(())) => drop(socket.poll_flush_unpin(cx)),
                        Poll::Pending => {}
                    }
                }
                socket.poll_next_unpin(cx)
            }
            PollingTransport::Polling(_) => Poll::Pending,
        }
    }
}

impl Sink<Message> for PollingTransport {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = &mut *self;
        if let PollingTransport::Polling(end) = this {
            match end.poll_upgraded(cx) {
                Some(socket) => this.upgrade(socket),
                None if end.poll_closed(cx) => return Poll::Ready(Err(WsError::ConnectionClosed)),
                None => {
                    return end
                        .outgoing
                        .poll_reserve(cx)
                        .map_err(|_| WsError::ConnectionClosed);
                }
            }
        }
        match this {
            PollingTransport::Upgraded {
                socket, leftover, ..
            } => {
                ready!(poll_leftover(socket, leftover, cx))?;
                socket.poll_ready_unpin(cx)
            }
            PollingTransport::Polling(_) => Poll::Pending,
        }
    }

    fn start_send(mut self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        match &mut *self {
            PollingTransport::Upgraded { socket, .. } => socket.start_send_unpin(message),
            PollingTransport::Polling(end) => {
                let packet = match message {
                    Message::Text(text) => text,
                    Message::Close(_) => {
                        end.said_goodbye = true;
                        Utf8Bytes::from_static(CLOSE)
                    }
                    _ => {
                        end.outgoing.abort_send();
                        return Ok(());
                    }
                };
                end.outgoing
                    .send_item(packet)
                    .map_err(|_| WsError::ConnectionClosed)
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.poll_websocket(cx, |socket, cx| socket.poll_flush_unpin(cx))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.poll_websocket(cx, |socket, cx| socket.poll_close_unpin(cx))
    }
}

impl PollingTransport {
    /// Flushes or closes the websocket, `then`, once the leftover is out; long polling has
    /// nothing to flush, and its session ends with the transport.
    fn poll_websocket(
        &mut self,
        cx: &mut Context<'_>,
        then: fn(&mut Socket, &mut Context<'_>) -> Poll<Result<(), WsError>>,
    ) -> Poll<Result<(), WsError>> {
        match self {
            PollingTransport::Upgraded {
                socket, leftover, ..
            } => {
                ready!(poll_leftover(socket, leftover, cx))?;
                then(socket, cx)
            }
            PollingTransport::Polling(_) => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_join_packets_with_the_record_separator() {
        assert_eq!(join(Vec::new()), "6");
        assert_eq!(join(vec!["2".into()]), "2");
        let packets = vec!["40{}".into(), "42[\"a\"]".into(), "1".into()];
        assert_eq!(join(packets), "40{}\u{1e}42[\"a\"]\u{1e}1");
    }
}
