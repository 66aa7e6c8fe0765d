//! Alarms: one task that sends actors a message when their time comes, so that an actor waiting
//! to hear it (a conversation's idle check) costs an entry in a timer wheel rather than a task
//! of its own.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::time::DelayQueue;

use super::mailbox::Mailbox;

/// The furthest an alarm rings ahead: one set later rings then (a conversation's idle check
/// sets itself again for the rest). The timer wheel holds about two years at most.
const FURTHEST: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Sets alarms; the task ends when the last handle is dropped, with the alarms not yet due.
pub struct Alarms<M: Send + 'static> {
    set: mpsc::UnboundedSender<(Instant, Mailbox<M>)>,
}

impl<M: Send + 'static> Alarms<M> {
    /// Starts the task on the current runtime; each alarm sends its actor `ring()`.
    pub fn start(ring: fn() -> M) -> Self {
        let (set, alarms) = mpsc::unbounded_channel();
        tokio::spawn(run(alarms, ring));
        Alarms { set }
    }

    /// Sends `actor` the alarm's message after `after`, or [`FURTHEST`] if that is sooner (lost
    /// if it has stopped by then).
    pub fn set(&self, actor: &Mailbox<M>, after: Duration) {
        let at = Instant::now() + after.min(FURTHEST);
        let _ = self.set.send((at, actor.clone()));
    }
}

async fn run<M: Send + 'static>(
    mut alarms: mpsc::UnboundedReceiver<(Instant, Mailbox<M>)>,
    ring: fn() -> M,
) {
    let mut due = DelayQueue::new();
    loop {
        tokio::select! {
            alarm = alarms.recv() => match alarm {
                Some((at, actor)) => {
                    due.insert_at(actor, at);
                }
                None => return,
            },
            Some(expired) = due.next(), if !due.is_empty() => {
                let _ = expired.into_inner().send(ring());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mailbox::{self, Actor};
    use super::*;

    /// Tells its test which actor heard an alarm, and when.
    struct Listener(u32, mpsc::UnboundedSender<(u32, Instant)>);

    impl Actor for Listener {
        type Msg = ();

        async fn handle(&mut self, _: &Mailbox<()>, (): ()) {
            let _ = self.1.send((self.0, Instant::now()));
        }

        fn stopped(&mut self) {}
    }

    /// Listeners 1 and 2, what they hear, and alarms for them.
    struct Setup {
        one: Mailbox<()>,
        two: Mailbox<()>,
        hearing: mpsc::UnboundedReceiver<(u32, Instant)>,
        alarms: Alarms<()>,
    }

    async fn setup() -> Setup {
        let (heard, hearing) = mpsc::unbounded_channel();
        let listener = |id, heard| async move {
            let start = move |_| async move { Ok::<_, ()>(Listener(id, heard)) };
            mailbox::spawn(start, |_, _| {}).await.unwrap()
        };
        Setup {
            one: listener(1, heard.clone()).await,
            two: listener(2, heard).await,
            hearing,
            alarms: Alarms::start(|| ()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_actor_hears_its_alarm_when_it_is_due_and_once() {
        let mut setup = setup().await;
        let start = Instant::now();
        setup.alarms.set(&setup.one, Duration::from_millis(300));
        setup.alarms.set(&setup.two, Duration::from_millis(100));

        // Due on the timer wheel's next millisecond.
        let on_time = |at: Instant, after: u64| {
            let waited = at - start;
            waited >= Duration::from_millis(after) && waited <= Duration::from_millis(after + 2)
        };
        let (first, at) = setup.hearing.recv().await.unwrap();
        assert_eq!(first, 2);
        assert!(on_time(at, 100), "{:?}", at - start);
        let (second, at) = setup.hearing.recv().await.unwrap();
        assert_eq!(second, 1);
        assert!(on_time(at, 300), "{:?}", at - start);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(setup.hearing.try_recv().is_err(), "one message per alarm");
    }

    #[tokio::test(start_paused = true)]
    async fn an_alarm_set_beyond_the_furthest_rings_then() {
        let mut setup = setup().await;
        let start = Instant::now();
        setup.alarms.set(&setup.one, Duration::MAX);
        let (first, at) = setup.hearing.recv().await.unwrap();
        assert_eq!(first, 1);
        assert!(at - start >= FURTHEST && at - start <= FURTHEST + Duration::from_millis(2));

        setup.alarms.set(&setup.two, Duration::from_millis(100));
        assert_eq!(
            setup.hearing.recv().await.unwrap().0,
            2,
            "the alarms still ring"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_alarm_for_a_stopped_actor_is_dropped_and_the_rest_ring() {
        let mut setup = setup().await;
        setup.alarms.set(&setup.one, Duration::from_millis(100));
        setup.alarms.set(&setup.two, Duration::from_millis(200));
        setup.one.stop();

        assert_eq!(setup.hearing.recv().await.unwrap().0, 2);
    }
}
