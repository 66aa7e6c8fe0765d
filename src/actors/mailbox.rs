//! The conversation actors' runtime: an actor is one task and a [`Mailbox`] that holds memory
//! only while messages wait in it.
//!
//! There is one conversation actor per active conversation, so what an actor costs is what a
//! conversation costs. ractor spends about 5.8 KB on each (two channels with their first blocks
//! allocated up front, its task, its cell); an actor here costs its task and a 96-byte mailbox
//! (BENCHMARKS.md has the heap profiles). The semantics are ractor's: messages are handled one
//! at a time, in order; a stop takes effect once the message in hand is handled, and the messages
//! still waiting are dropped; a handler that panics fails the actor, which its supervisor hears
//! of, and its state is dropped without [`Actor::stopped`].

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::FutureExt;
use tokio::sync::{Notify, oneshot};

/// An actor: its state, and how it handles each message.
pub trait Actor: Send + 'static {
    type Msg: Send + 'static;

    /// Handles one message; `myself` is the actor's own mailbox.
    fn handle(
        &mut self,
        myself: &Mailbox<Self::Msg>,
        message: Self::Msg,
    ) -> impl Future<Output = ()> + Send;

    /// The actor has stopped on purpose (not failed).
    fn stopped(&mut self);
}

/// Where an actor's messages go; its clones are the same mailbox.
pub struct Mailbox<M> {
    shared: Arc<Shared<M>>,
}

impl<M> Clone for Mailbox<M> {
    fn clone(&self) -> Self {
        Mailbox {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<M> {
    queue: Mutex<Queue<M>>,
    /// Woken when a message arrives or the actor is stopped.
    ready: Notify,
}

struct Queue<M> {
    /// Unallocated while empty.
    waiting: VecDeque<M>,
    open: bool,
}

/// Why an actor did not start.
#[derive(Debug)]
pub enum NotStarted<E> {
    /// Its start refused, with this error.
    Refused(E),
    /// Its start panicked (or its runtime is shutting down); its mailbox is closed.
    Panicked,
}

impl<M> Mailbox<M> {
    fn new() -> Self {
        Mailbox {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    waiting: VecDeque::new(),
                    open: true,
                }),
                ready: Notify::new(),
            }),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue<M>> {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leaves `message` for the actor; gives it back when the actor has stopped.
    pub fn send(&self, message: M) -> Result<(), M> {
        let mut queue = self.queue();
        if !queue.open {
            return Err(message);
        }
        queue.waiting.push_back(message);
        drop(queue);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Stops the actor once it has handled the message in hand: the messages waiting are
    /// dropped, and later ones refused.
    pub fn stop(&self) {
        let dropped = {
            let mut queue = self.queue();
            queue.open = false;
            std::mem::take(&mut queue.waiting)
        };
        drop(dropped);
        self.shared.ready.notify_one();
    }

    /// Whether `other` is this same mailbox.
    pub fn is(&self, other: &Mailbox<M>) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// The next message; `None` once the actor is stopped.
    async fn next(&self) -> Option<M> {
        loop {
            {
                let mut queue = self.queue();
                if !queue.open {
                    return None;
                }
                if let Some(message) = queue.waiting.pop_front() {
                    if queue.waiting.is_empty() {
                        // Most actors wait far longer than they work: give the room back.
                        queue.waiting = VecDeque::new();
                    }
                    return Some(message);
                }
            }
            self.shared.ready.notified().await;
        }
    }
}

/// Starts an actor on its own task: `start` builds its state, given its mailbox (messages sent
/// meanwhile wait there), and the answer comes once it has. `failed` hears, with the panic's
/// message, that a handler of the started actor panicked; the mailbox is closed by then.
pub async fn spawn<A, E, S, F, P>(start: S, failed: P) -> Result<Mailbox<A::Msg>, NotStarted<E>>
where
    A: Actor,
    E: Send + 'static,
    S: FnOnce(Mailbox<A::Msg>) -> F + Send + 'static,
    F: Future<Output = Result<A, E>> + Send + 'static,
    P: FnOnce(&Mailbox<A::Msg>, String) + Send + 'static,
{
    let mailbox = Mailbox::new();
    let (started, starting) = oneshot::channel();
    let own = mailbox.clone();
    tokio::spawn(async move {
        let mut actor = match AssertUnwindSafe(start(own.clone())).catch_unwind().await {
            Ok(Ok(actor)) => actor,
            refused => {
                own.stop();
                let _ = started.send(Err(match refused {
                    Ok(Err(error)) => NotStarted::Refused(error),
                    _ => NotStarted::Panicked,
                }));
                return;
            }
        };
        let _ = started.send(Ok(()));
        let run = async {
            while let Some(message) = own.next().await {
                actor.handle(&own, message).await;
            }
            actor.stopped();
        };
        if let Err(panic) = AssertUnwindSafe(run).catch_unwind().await {
            own.stop();
            failed(&own, panic_message(&*panic));
        }
    });
    match starting.await {
        Ok(Ok(())) => Ok(mailbox),
        Ok(Err(not_started)) => Err(not_started),
        Err(_) => Err(NotStarted::Panicked),
    }
}

/// What a panic said.
fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message.to_string()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "panicked".into()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::*;

    /// Tells its test what it handled and whether it stopped; panics on 0 and stops on 1.
    struct Recorder(mpsc::UnboundedSender<Option<u32>>);

    impl Actor for Recorder {
        type Msg = u32;

        async fn handle(&mut self, myself: &Mailbox<u32>, message: u32) {
            tokio::task::yield_now().await;
            let _ = self.0.send(Some(message));
            match message {
                0 => panic!("told to fail"),
                1 => myself.stop(),
                _ => {}
            }
        }

        fn stopped(&mut self) {
            let _ = self.0.send(None);
        }
    }

    /// A started recorder, what it tells, and what its supervisor hears.
    async fn recorder() -> (
        Mailbox<u32>,
        mpsc::UnboundedReceiver<Option<u32>>,
        oneshot::Receiver<String>,
    ) {
        let (told, telling) = mpsc::unbounded_channel();
        let (failed, failure) = oneshot::channel();
        let start = |_| async { Ok::<_, ()>(Recorder(told)) };
        let supervise = move |_: &Mailbox<u32>, error| {
            let _ = failed.send(error);
        };
        (spawn(start, supervise).await.unwrap(), telling, failure)
    }

    async fn next(telling: &mut mpsc::UnboundedReceiver<Option<u32>>) -> Option<Option<u32>> {
        tokio::time::timeout(Duration::from_secs(5), telling.recv())
            .await
            .expect("the actor answers")
    }

    #[tokio::test]
    async fn messages_are_handled_one_at_a_time_in_order() {
        let (mailbox, mut telling, _) = recorder().await;
        for message in 2..50 {
            mailbox.send(message).unwrap();
        }
        for message in 2..50 {
            assert_eq!(next(&mut telling).await, Some(Some(message)));
        }
    }

    #[tokio::test]
    async fn a_stop_drops_what_waits_and_refuses_what_comes_later() {
        let (mailbox, mut telling, _) = recorder().await;
        for message in [2, 1, 3, 4] {
            mailbox.send(message).unwrap();
        }
        assert_eq!(next(&mut telling).await, Some(Some(2)));
        assert_eq!(next(&mut telling).await, Some(Some(1)));
        assert_eq!(next(&mut telling).await, Some(None), "stopped, and told so");
        assert_eq!(
            next(&mut telling).await,
            None,
            "3 and 4 dropped with the actor"
        );
        assert_eq!(mailbox.send(5), Err(5));
    }

    #[tokio::test]
    async fn a_panic_fails_the_actor_and_its_supervisor_hears() {
        let (mailbox, mut telling, failure) = recorder().await;
        mailbox.send(0).unwrap();
        let _ = mailbox.send(2);
        assert_eq!(failure.await.unwrap(), "told to fail");
        assert_eq!(next(&mut telling).await, Some(Some(0)));
        assert_eq!(next(&mut telling).await, None, "2 dropped, and not stopped");
        assert_eq!(mailbox.send(3), Err(3));
    }

    /// Starts a recorder whose start refuses, or panics; answers with the mailbox it was given.
    async fn fail_to_start(panics: bool) -> (Result<(), NotStarted<&'static str>>, Mailbox<u32>) {
        let seen = Arc::new(Mutex::new(None));
        let kept = seen.clone();
        let start = move |myself: Mailbox<u32>| async move {
            *kept.lock().unwrap() = Some(myself);
            if panics {
                panic!("cannot start");
            }
            Err::<Recorder, _>("no")
        };
        let supervise = |_: &Mailbox<u32>, _| panic!("only a started actor fails");
        let answer = spawn(start, supervise).await.map(drop);
        let myself = seen.lock().unwrap().take().unwrap();
        (answer, myself)
    }

    #[tokio::test]
    async fn a_refused_start_answers_its_error_and_takes_no_message() {
        let (answer, myself) = fail_to_start(false).await;
        assert!(matches!(answer, Err(NotStarted::Refused("no"))));
        assert_eq!(myself.send(2), Err(2));
    }

    #[tokio::test]
    async fn a_start_that_panics_answers_so_and_takes_no_message() {
        let (answer, myself) = fail_to_start(true).await;
        assert!(matches!(answer, Err(NotStarted::Panicked)));
        assert_eq!(myself.send(2), Err(2));
    }
}
