//! The manager process: what it holds, how it answers each request, and the connection
//! threads. Blocking requests (a queue's get and put, a lock's acquire, an event's wait)
//! wait on a condition variable of the connection's own thread, never holding the state
//! lock, so they block nobody else; while waiting they watch their connection, and stop
//! when the client is gone.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::served::{Object, Registry};
use super::table::{Table, TableError};
use super::wire::{Link, Reply, Request, Where};
use crate::connection::Listener;
use crate::ipc::FrameReader;
use crate::shm::{ShareableList, SharedMemory};
use crate::Queue;

/// How long the manager waits for a dict's lock on behalf of a remote proxy.
const DICT_LOCK_WAIT: Duration = Duration::from_secs(30);

/// How often a blocked request looks whether its client is still there.
const WATCH_CLIENT: Duration = Duration::from_millis(100);

/// A queue held by the manager.
#[derive(Default)]
struct ServerQueue {
    items: VecDeque<Vec<u8>>,
    /// 0: no limit.
    maxsize: usize,
}

/// What a manager holds.
#[derive(Default)]
pub(super) struct State {
    /// Each dict's table (shared memory that local proxies use in place; the manager
    /// answers remote proxies from it).
    dicts: HashMap<u64, Table>,
    lists: HashMap<u64, Vec<Vec<u8>>>,
    queues: HashMap<u64, ServerQueue>,
    /// Each lock's holder: the connection that acquired it.
    locks: HashMap<u64, Option<u64>>,
    events: HashMap<u64, bool>,
    objects: HashMap<u64, Arc<Mutex<Box<dyn Object>>>>,
    /// Published objects: id and proxy type, by name.
    names: HashMap<String, (u64, String)>,
    blocks: Vec<SharedMemory>,
    shareable: Vec<ShareableList>,
    next_id: u64,
}

impl State {
    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// The state, and the condition variable every blocked request waits on.
#[derive(Default)]
pub(super) struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The connection a request came on.
struct Client<'a> {
    id: u64,
    sock: BorrowedFd<'a>,
}

impl Client<'_> {
    /// Whether the client went away (or broke the protocol by sending while it waits for
    /// an answer): its socket is readable.
    fn gone(&self) -> bool {
        crate::sys::wait_ready(self.sock, false, Some(Instant::now())).unwrap_or(true)
    }
}

/// How a blocking request ended.
enum Waited<T> {
    Done(T),
    TimedOut,
    /// The client is gone: nothing to answer.
    Abandoned,
}

/// Waits until `attempt` succeeds (it runs under the state lock), `timeout` passes
/// (`None`: never), or the client goes away.
fn block_until<T>(
    shared: &Shared,
    client: &Client<'_>,
    timeout: Option<Duration>,
    mut attempt: impl FnMut(&mut State) -> Option<T>,
) -> Waited<T> {
    let deadline = timeout.and_then(crate::time::deadline);
    let mut state = shared.lock();
    loop {
        if let Some(v) = attempt(&mut state) {
            return Waited::Done(v);
        }
        let slice = match crate::time::remaining(deadline) {
            Some(left) if left.is_zero() => return Waited::TimedOut,
            Some(left) => left.min(WATCH_CLIENT),
            None => WATCH_CLIENT,
        };
        let (s, waited) = shared
            .changed
            .wait_timeout(state, slice)
            .unwrap_or_else(|p| p.into_inner());
        state = s;
        if waited.timed_out() && client.gone() {
            return Waited::Abandoned;
        }
    }
}

/// An answer, or nothing (the client is gone).
type Answer = Option<Reply>;

fn answer<R: Registry>(shared: &Shared, client: &Client<'_>, req: Request) -> Answer {
    match req {
        Request::Put {
            queue,
            item,
            timeout,
        } => {
            let mut item = Some(item);
            let got = block_until(shared, client, timeout, |st| {
                let Some(q) = st.queues.get_mut(&queue) else {
                    return Some(Err(()));
                };
                if q.maxsize != 0 && q.items.len() >= q.maxsize {
                    return None;
                }
                q.items.extend(item.take());
                Some(Ok(()))
            });
            match got {
                Waited::Done(Ok(())) => {
                    shared.changed.notify_all();
                    Some(Reply::Done)
                }
                Waited::Done(Err(())) => Some(no("queue", queue)),
                Waited::TimedOut => Some(Reply::Full),
                Waited::Abandoned => None,
            }
        }
        Request::Take { queue, timeout } => {
            let got = block_until(shared, client, timeout, |st| {
                match st.queues.get_mut(&queue) {
                    None => Some(None),
                    Some(q) => q.items.pop_front().map(Some),
                }
            });
            match got {
                Waited::Done(Some(item)) => {
                    shared.changed.notify_all();
                    Some(Reply::Value(Some(item)))
                }
                Waited::Done(None) => Some(no("queue", queue)),
                Waited::TimedOut => Some(Reply::Empty),
                Waited::Abandoned => None,
            }
        }
        Request::Acquire { lock, timeout } => {
            let got = block_until(shared, client, timeout, |st| {
                match st.locks.get_mut(&lock) {
                    None => Some(false),
                    Some(holder @ None) => {
                        *holder = Some(client.id);
                        Some(true)
                    }
                    Some(Some(_)) => None,
                }
            });
            match got {
                Waited::Done(true) => Some(Reply::Flag(true)),
                Waited::Done(false) => Some(no("lock", lock)),
                Waited::TimedOut => Some(Reply::Flag(false)),
                Waited::Abandoned => None,
            }
        }
        Request::WaitEvent { event, timeout } => {
            let got = block_until(shared, client, timeout, |st| match st.events.get(&event) {
                None => Some(false),
                Some(true) => Some(true),
                Some(false) => None,
            });
            match got {
                Waited::Done(true) => Some(Reply::Flag(true)),
                Waited::Done(false) => Some(no("event", event)),
                Waited::TimedOut => Some(Reply::Flag(false)),
                Waited::Abandoned => None,
            }
        }
        Request::CallObject { object, call } => {
            let Some(obj) = shared.lock().objects.get(&object).cloned() else {
                return Some(no("object", object));
            };
            let mut obj = obj.lock().unwrap_or_else(|p| p.into_inner());
            Some(
                match std::panic::catch_unwind(AssertUnwindSafe(|| obj.call(&call))) {
                    Ok(Ok(reply)) => Reply::Value(Some(reply)),
                    Ok(Err(reason)) => Reply::Refused(reason),
                    Err(panic) => Reply::Refused(format!(
                        "the method panicked: {}",
                        crate::pool::panic_message(&*panic)
                    )),
                },
            )
        }
        Request::NewObject { typeid, args } => {
            let made = std::panic::catch_unwind(AssertUnwindSafe(|| R::make(&typeid, &args)));
            Some(match made {
                Ok(Some(Ok(obj))) => {
                    let mut st = shared.lock();
                    let id = st.new_id();
                    st.objects.insert(id, Arc::new(Mutex::new(obj)));
                    Reply::Id(id)
                }
                Ok(Some(Err(reason))) => Reply::Refused(reason),
                Ok(None) => Reply::Refused(format!(
                    "{typeid} is not registered with this manager (Manager::builder().register::<{typeid}>())"
                )),
                Err(panic) => Reply::Refused(format!(
                    "creating a {typeid} panicked: {}",
                    crate::pool::panic_message(&*panic)
                )),
            })
        }
        Request::NewDict => Some(match Table::create() {
            Ok(t) => {
                let mut st = shared.lock();
                let id = st.new_id();
                st.dicts.insert(id, t);
                Reply::Id(id)
            }
            Err(e) => Reply::Refused(format!("making the dict's shared memory: {e}")),
        }),
        Request::Get { dict, key } => Some(on_dict(shared, dict, |t, by| {
            t.get(&key, by, <[u8]>::to_vec).map(Reply::Value)
        })),
        Request::Set { dict, key, value } => Some(on_dict(shared, dict, |t, by| {
            t.set(&key, &value, by).map(|()| Reply::Done)
        })),
        Request::Del { dict, key } => Some(on_dict(shared, dict, |t, by| {
            t.remove(&key, by, <[u8]>::to_vec).map(Reply::Value)
        })),
        Request::Len { dict } => Some(on_dict(shared, dict, |t, by| {
            t.len(by).map(|n| Reply::Len(n as u64))
        })),
        Request::Items { dict } => Some(on_dict(shared, dict, |t, by| {
            let mut items = Vec::new();
            t.for_each(by, |k, v| items.push((k.to_vec(), v.to_vec())))?;
            Ok(Reply::Items(items))
        })),
        Request::Clear { dict } => Some(on_dict(shared, dict, |t, by| {
            t.clear(by).map(|()| Reply::Done)
        })),
        Request::DictTable { dict } => Some(match shared.lock().dicts.contains_key(&dict) {
            true => Reply::Table(dict),
            false => no("dict", dict),
        }),
        other => {
            let (reply, notify) = answer_now(&mut shared.lock(), client, other);
            if notify {
                shared.changed.notify_all();
            }
            Some(reply)
        }
    }
}

/// Runs `op` on dict `dict`'s table, outside the state lock (the table has its own).
fn on_dict(
    shared: &Shared,
    dict: u64,
    op: impl FnOnce(&Table, Option<Instant>) -> Result<Reply, TableError>,
) -> Reply {
    let Some(table) = shared.lock().dicts.get(&dict).cloned() else {
        return no("dict", dict);
    };
    op(&table, crate::time::deadline(DICT_LOCK_WAIT))
        .unwrap_or_else(|e| Reply::Refused(e.to_string()))
}

fn no(what: &str, id: u64) -> Reply {
    Reply::Refused(format!("no {what} {id}"))
}

/// Answers a request that does not wait; also whether waiters should look again.
fn answer_now(st: &mut State, client: &Client<'_>, req: Request) -> (Reply, bool) {
    let at = |index: u64, len: usize| usize::try_from(index).ok().filter(|&i| i < len);
    let reply = match req {
        Request::NewList => {
            let id = st.new_id();
            st.lists.insert(id, Vec::new());
            Reply::Id(id)
        }
        Request::Append { list, value } => match st.lists.get_mut(&list) {
            Some(l) => {
                l.push(value);
                Reply::Done
            }
            None => no("list", list),
        },
        Request::ListGet { list, index } => match st.lists.get(&list) {
            Some(l) => Reply::Value(at(index, l.len()).map(|i| l[i].clone())),
            None => no("list", list),
        },
        Request::ListSet { list, index, value } => match st.lists.get_mut(&list) {
            Some(l) => match at(index, l.len()) {
                Some(i) => {
                    l[i] = value;
                    Reply::Done
                }
                None => Reply::Refused(format!(
                    "list assignment index {index} out of range (the list has {} items)",
                    l.len()
                )),
            },
            None => no("list", list),
        },
        Request::Pop { list } => match st.lists.get_mut(&list) {
            Some(l) => Reply::Value(l.pop()),
            None => no("list", list),
        },
        Request::ListLen { list } => match st.lists.get(&list) {
            Some(l) => Reply::Len(l.len() as u64),
            None => no("list", list),
        },
        Request::ListAll { list } => match st.lists.get(&list) {
            Some(l) => Reply::Values(l.clone()),
            None => no("list", list),
        },
        Request::NewQueue { maxsize } => match usize::try_from(maxsize) {
            Ok(maxsize) => {
                let id = st.new_id();
                st.queues.insert(
                    id,
                    ServerQueue {
                        items: VecDeque::new(),
                        maxsize,
                    },
                );
                Reply::Id(id)
            }
            Err(_) => Reply::Refused(format!("a queue of {maxsize} items is too large")),
        },
        Request::QueueLen { queue } => match st.queues.get(&queue) {
            Some(q) => Reply::Len(q.items.len() as u64),
            None => no("queue", queue),
        },
        Request::NewLock => {
            let id = st.new_id();
            st.locks.insert(id, None);
            Reply::Id(id)
        }
        Request::Release { lock } => match st.locks.get_mut(&lock) {
            Some(holder) if *holder == Some(client.id) => {
                *holder = None;
                return (Reply::Done, true);
            }
            Some(_) => Reply::Refused("release of a lock this proxy does not hold".into()),
            None => no("lock", lock),
        },
        Request::Locked { lock } => match st.locks.get(&lock) {
            Some(holder) => Reply::Flag(holder.is_some()),
            None => no("lock", lock),
        },
        Request::NewEvent => {
            let id = st.new_id();
            st.events.insert(id, false);
            Reply::Id(id)
        }
        Request::SetEvent { event, set } => match st.events.get_mut(&event) {
            Some(flag) => {
                *flag = set;
                return (Reply::Done, set);
            }
            None => no("event", event),
        },
        Request::IsSet { event } => match st.events.get(&event) {
            Some(flag) => Reply::Flag(*flag),
            None => no("event", event),
        },
        Request::Publish { name, id, kind } => {
            st.names.insert(name, (id, kind));
            Reply::Done
        }
        Request::Lookup { name } => match st.names.get(&name) {
            Some((id, kind)) => Reply::Found(*id, kind.clone()),
            None => Reply::Refused(format!("nothing is published as {name:?}")),
        },
        Request::NewBlock { size } => {
            match usize::try_from(size)
                .map_err(|_| format!("{size} bytes is too large"))
                .and_then(|size| SharedMemory::create(size).map_err(|e| e.to_string()))
            {
                Ok(block) => {
                    let name = block.name().to_string();
                    st.blocks.push(block);
                    Reply::Name(name)
                }
                Err(reason) => Reply::Refused(reason),
            }
        }
        Request::NewShareableList { items, capacity } => {
            let made = match usize::try_from(capacity) {
                Ok(0) => ShareableList::new(items),
                Ok(c) => ShareableList::with_capacity(items, c),
                Err(_) => return (Reply::Refused(format!("{capacity} is too large")), false),
            };
            match made {
                Ok(list) => {
                    let name = list.name().to_string();
                    st.shareable.push(list);
                    Reply::Name(name)
                }
                Err(e) => Reply::Refused(e.to_string()),
            }
        }
        Request::UnlinkAll => {
            // Blocks a client unlinked already are skipped (unlink checks the name still
            // names the same block).
            for b in st.blocks.drain(..) {
                let _ = b.unlink();
            }
            for l in st.shareable.drain(..) {
                let _ = l.shm().unlink();
            }
            Reply::Done
        }
        Request::Ping => Reply::Done,
        // Answered by `answer`: blocking requests, and dicts (outside the state lock).
        Request::NewDict
        | Request::Get { .. }
        | Request::Set { .. }
        | Request::Del { .. }
        | Request::Len { .. }
        | Request::Items { .. }
        | Request::Clear { .. }
        | Request::DictTable { .. }
        | Request::Put { .. }
        | Request::Take { .. }
        | Request::Acquire { .. }
        | Request::WaitEvent { .. }
        | Request::CallObject { .. }
        | Request::NewObject { .. } => Reply::Refused("unexpected request".into()),
    };
    (reply, false)
}

/// Serves one connection until it closes; then releases the locks it held.
fn serve_connection<R: Registry>(shared: &Shared, id: u64, mut link: Link) {
    while let Ok(req) = link.recv::<Request>(None, Duration::MAX) {
        let client = Client {
            id,
            sock: link.sock.as_fd(),
        };
        let taken = match &req {
            Request::Take { queue, .. } => Some(*queue),
            _ => None,
        };
        let Some(reply) = answer::<R>(shared, &client, req) else {
            break;
        };
        let table = match &reply {
            Reply::Table(dict) => shared.lock().dicts.get(dict).cloned(),
            _ => None,
        };
        let sent = match &table {
            Some(t) => link.send_with(&reply, &[t.fd()]),
            None => link.send(&reply),
        };
        if let Err(_lost) = sent {
            // The client is gone: an item it took goes back to the front of its queue.
            if let (Some(queue), Reply::Value(Some(item))) = (taken, reply) {
                if let Some(q) = shared.lock().queues.get_mut(&queue) {
                    q.items.push_front(item);
                }
                shared.changed.notify_all();
            }
            break;
        }
    }
    let mut st = shared.lock();
    let mut released = false;
    for holder in st.locks.values_mut() {
        if *holder == Some(id) {
            *holder = None;
            released = true;
        }
    }
    drop(st);
    if released {
        shared.changed.notify_all();
    }
}

/// What the manager process is given.
#[derive(Serialize, Deserialize)]
pub(super) struct Start {
    pub at: Where,
    pub authkey: Vec<u8>,
    /// Where to say it listens (its real address: a TCP port 0 becomes the port bound), or
    /// why it could not.
    pub ready: Queue<Result<Where, String>>,
}

/// The manager process: binds, says so, and serves each connection on a thread.
pub(super) fn serve<R: Registry>(start: Start) {
    let Start { at, authkey, ready } = start;
    let listener = match Listener::builder(at.address()).authkey(&authkey).bind() {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.put(Err(format!("binding: {e}")));
            return;
        }
    };
    if ready
        .put(Ok(Where::from_address(listener.address())))
        .is_err()
    {
        return;
    }
    drop(ready);
    let shared: Arc<Shared> = Default::default();
    let mut next_conn = 0u64;
    loop {
        // A failed handshake (a stranger without the key) ends that connection only.
        let Ok(conn) = listener.accept() else {
            continue;
        };
        next_conn += 1;
        let id = next_conn;
        let shared = shared.clone();
        let link = Link {
            sock: conn.into_fd(),
            reader: FrameReader::default(),
        };
        let _ = std::thread::Builder::new()
            .name("gpuproc-manager".into())
            .spawn(move || serve_connection::<R>(&shared, id, link));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    /// A client connection: our end, and the peer's (the client's) end.
    fn client_socket() -> (OwnedFd, OwnedFd) {
        crate::sys::socketpair().unwrap()
    }

    fn ask(shared: &Shared, id: u64, sock: &OwnedFd, req: Request) -> Option<Reply> {
        let client = Client {
            id,
            sock: sock.as_fd(),
        };
        answer::<()>(shared, &client, req)
    }

    fn new_id(shared: &Shared, sock: &OwnedFd, req: Request) -> u64 {
        match ask(shared, 1, sock, req) {
            Some(Reply::Id(id)) => id,
            other => panic!("{other:?}"),
        }
    }

    const NOW: Option<Duration> = Some(Duration::ZERO);

    #[test]
    fn a_bounded_queue_is_full_then_empty() {
        let shared = Shared::default();
        let (sock, _peer) = client_socket();
        let q = new_id(&shared, &sock, Request::NewQueue { maxsize: 1 });
        let put = |item: u8| Request::Put {
            queue: q,
            item: vec![item],
            timeout: NOW,
        };
        assert!(matches!(ask(&shared, 1, &sock, put(1)), Some(Reply::Done)));
        assert!(matches!(ask(&shared, 1, &sock, put(2)), Some(Reply::Full)));
        let take = Request::Take {
            queue: q,
            timeout: Some(Duration::from_millis(1)),
        };
        assert!(matches!(
            ask(&shared, 1, &sock, take),
            Some(Reply::Value(Some(v))) if v == [1]
        ));
        let take = Request::Take {
            queue: q,
            timeout: NOW,
        };
        assert!(matches!(ask(&shared, 1, &sock, take), Some(Reply::Empty)));
        let unknown = Request::Take {
            queue: 999,
            timeout: None,
        };
        assert!(matches!(
            ask(&shared, 1, &sock, unknown),
            Some(Reply::Refused(_))
        ));
    }

    #[test]
    fn a_lock_belongs_to_the_connection_that_acquired_it() {
        let shared = Shared::default();
        let (sock, _peer) = client_socket();
        let lock = new_id(&shared, &sock, Request::NewLock);
        let acquire = || Request::Acquire { lock, timeout: NOW };
        assert!(matches!(
            ask(&shared, 1, &sock, acquire()),
            Some(Reply::Flag(true))
        ));
        assert!(matches!(
            ask(&shared, 2, &sock, acquire()),
            Some(Reply::Flag(false))
        ));
        // Not the holder: refused, and the lock stays held.
        assert!(matches!(
            ask(&shared, 2, &sock, Request::Release { lock }),
            Some(Reply::Refused(_))
        ));
        assert!(matches!(
            ask(&shared, 2, &sock, Request::Locked { lock }),
            Some(Reply::Flag(true))
        ));
        assert!(matches!(
            ask(&shared, 1, &sock, Request::Release { lock }),
            Some(Reply::Done)
        ));
        assert!(matches!(
            ask(&shared, 2, &sock, acquire()),
            Some(Reply::Flag(true))
        ));
    }

    #[test]
    fn a_blocked_request_of_a_client_that_left_is_abandoned() {
        let shared = Shared::default();
        let (sock, peer) = client_socket();
        let event = new_id(&shared, &sock, Request::NewEvent);
        drop(peer);
        let wait = Request::WaitEvent {
            event,
            timeout: None,
        };
        assert!(ask(&shared, 1, &sock, wait).is_none());
    }

    #[test]
    fn an_event_wakes_a_waiting_thread() {
        let shared = Shared::default();
        let (sock, _peer) = client_socket();
        let event = new_id(&shared, &sock, Request::NewEvent);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                ask(
                    &shared,
                    2,
                    &sock,
                    Request::WaitEvent {
                        event,
                        timeout: Some(Duration::from_secs(60)),
                    },
                )
            });
            let set = Request::SetEvent { event, set: true };
            assert!(matches!(ask(&shared, 1, &sock, set), Some(Reply::Done)));
            assert!(matches!(waiter.join().unwrap(), Some(Reply::Flag(true))));
        });
    }

    #[test]
    fn an_unregistered_type_is_refused() {
        let shared = Shared::default();
        let (sock, _peer) = client_socket();
        let req = Request::NewObject {
            typeid: "Nothing".into(),
            args: Vec::new(),
        };
        assert!(matches!(
            ask(&shared, 1, &sock, req),
            Some(Reply::Refused(r)) if r.contains("not registered")
        ));
    }
}
