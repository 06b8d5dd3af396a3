//! Supervision of a process's long-running tasks: none fails silently.
//!
//! Each task has a name and a [`Restart`] policy. When one fails (returns an error or panics),
//! the failure is logged at `error!` with the task's name and error, then
//!
//! - [`Restart::Backoff`]: the task is started again after a delay that doubles from `min` up to
//!   `max` (and falls back to `min` once the task has run for `max` without failing);
//! - [`Restart::Never`]: every task is cancelled and [`Supervisor::run_until`] returns a
//!   [`SupervisorError`] naming the task, so the binary exits non-zero.
//!
//! A task that returns `Ok(())` has finished its job and is not restarted. Shutdown cancels the
//! shared [`CancellationToken`] (every task gets a child of it) and waits for the tasks, at most
//! the grace period ([`DEFAULT_GRACE`], [`Supervisor::with_grace`]); tasks still running then are
//! aborted and named in a warning.
//!
//! ```
//! # async fn example() -> Result<(), meshauth_telemetry::SupervisorError> {
//! use std::time::Duration;
//! use meshauth_telemetry::{Restart, Supervisor};
//!
//! let mut supervisor = Supervisor::new();
//! supervisor.spawn(
//!     "ticker",
//!     Restart::Backoff { min: Duration::from_secs(1), max: Duration::from_secs(30) },
//!     |token| async move {
//!         token.cancelled().await;
//!         Ok::<(), std::io::Error>(())
//!     },
//! );
//! supervisor.run_until(async { /* e.g. SIGTERM */ }).await
//! # }
//! ```

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::readiness::ReadyHandle;

/// Any error a task may fail with (`anyhow::Error` and every `std::error::Error` convert).
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// How long [`Supervisor::run_until`] waits for cancelled tasks by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// The shortest restart delay, whatever [`Restart::Backoff`] says (no hot restart loops).
pub const MIN_BACKOFF: Duration = Duration::from_millis(10);

/// What happens when a task fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// The process stops: every task is cancelled and [`Supervisor::run_until`] fails.
    Never,
    /// The task is started again after `min`, doubling up to `max`; the delay falls back to
    /// `min` when the task ran for at least `max` before failing.
    Backoff {
        /// The first delay (at least [`MIN_BACKOFF`]).
        min: Duration,
        /// The longest delay.
        max: Duration,
    },
}

/// Why [`Supervisor::run_until`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A task whose policy is [`Restart::Never`] failed (returned an error or panicked).
    #[error("task {task} failed")]
    TaskFailed {
        /// The task's name.
        task: &'static str,
        /// Its error.
        #[source]
        source: BoxError,
    },
}

impl SupervisorError {
    /// The name of the task that failed.
    pub fn task(&self) -> &'static str {
        match self {
            SupervisorError::TaskFailed { task, .. } => task,
        }
    }
}

type TaskFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
type Factory = Box<dyn FnMut(CancellationToken) -> TaskFuture + Send>;

struct Slot {
    name: &'static str,
    restart: Restart,
    factory: Factory,
    ready: Option<ReadyHandle>,
    /// The delay before the next restart.
    next_delay: Duration,
    /// When the current attempt started (or will, after its delay).
    started: Instant,
    failures: u64,
}

/// Named long-running tasks on a [`JoinSet`], cancelled together by one [`CancellationToken`].
///
/// Tasks start when spawned, so spawn them from within a Tokio runtime.
pub struct Supervisor {
    token: CancellationToken,
    grace: Duration,
    tasks: JoinSet<Result<(), BoxError>>,
    slots: Vec<Slot>,
    running: HashMap<Id, usize>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field(
                "tasks",
                &self.slots.iter().map(|s| s.name).collect::<Vec<_>>(),
            )
            .field("running", &self.running.len())
            .field("cancelled", &self.token.is_cancelled())
            .field("grace", &self.grace)
            .finish()
    }
}

/// Displays an error and its sources, `outer: inner: ...`.
struct Chain<'a>(&'a (dyn StdError + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

enum Event {
    Shutdown,
    Exited(Result<(Id, Result<(), BoxError>), JoinError>),
    Empty,
}

impl Supervisor {
    /// No tasks yet; the grace period is [`DEFAULT_GRACE`].
    pub fn new() -> Self {
        Supervisor {
            token: CancellationToken::new(),
            grace: DEFAULT_GRACE,
            tasks: JoinSet::new(),
            slots: Vec::new(),
            running: HashMap::new(),
        }
    }

    /// Sets how long shutdown waits for cancelled tasks before aborting them.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The token every task's token is a child of. Cancelling it shuts everything down, as the
    /// `shutdown` future of [`Supervisor::run_until`] does.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Starts task `name`. `factory` makes one attempt from a token that is cancelled at shutdown;
    /// it is called again for every restart.
    pub fn spawn<F, Fut, E>(&mut self, name: &'static str, restart: Restart, factory: F)
    where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.insert(name, restart, None, boxed(factory));
    }

    /// As [`Supervisor::spawn`], and `ready` is set not ready, with the error as the reason,
    /// whenever the task fails. Setting it ready is the task's job, once it is able to work.
    pub fn spawn_with_readiness<F, Fut, E>(
        &mut self,
        name: &'static str,
        restart: Restart,
        ready: ReadyHandle,
        factory: F,
    ) where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.insert(name, restart, Some(ready), boxed(factory));
    }

    /// Starts task `name` with [`Restart::Never`], from a closure that runs once (for tasks that
    /// own something, such as a bound listener, and so cannot be restarted).
    pub fn spawn_once<F, Fut, E>(&mut self, name: &'static str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let mut task = Some(task);
        let factory = move |token: CancellationToken| -> TaskFuture {
            match task.take() {
                Some(task) => {
                    let fut = task(token);
                    Box::pin(async move { fut.await.map_err(Into::into) })
                }
                // Never reached: a `Never` task is not restarted.
                None => Box::pin(async { Err(BoxError::from("a one-shot task cannot restart")) }),
            }
        };
        self.insert(name, Restart::Never, None, Box::new(factory));
    }

    fn insert(
        &mut self,
        name: &'static str,
        restart: Restart,
        ready: Option<ReadyHandle>,
        factory: Factory,
    ) {
        let restart = match restart {
            Restart::Never => Restart::Never,
            Restart::Backoff { min, max } => {
                let min = min.max(MIN_BACKOFF);
                Restart::Backoff {
                    min,
                    max: max.max(min),
                }
            }
        };
        let next_delay = match restart {
            Restart::Never => Duration::ZERO,
            Restart::Backoff { min, .. } => min,
        };
        self.slots.push(Slot {
            name,
            restart,
            factory,
            ready,
            next_delay,
            started: Instant::now(),
            failures: 0,
        });
        self.start(self.slots.len() - 1, Duration::ZERO);
    }

    fn start(&mut self, index: usize, delay: Duration) {
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let token = self.token.child_token();
        let attempt = (slot.factory)(token.clone());
        slot.started = Instant::now() + delay;
        let handle = self.tasks.spawn(async move {
            if !delay.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = token.cancelled() => return Ok(()),
                }
            }
            attempt.await
        });
        self.running.insert(handle.id(), index);
    }

    /// Supervises the tasks until `shutdown` completes, the [`Supervisor::token`] is cancelled,
    /// a [`Restart::Never`] task fails, or no task is left; then cancels every task and waits
    /// for them (at most the grace period). Fails only if a `Never` task failed, before or
    /// during shutdown.
    pub async fn run_until(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), SupervisorError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let token = self.token.clone();
        let mut failed = None;
        loop {
            let event = tokio::select! {
                () = &mut shutdown => Event::Shutdown,
                () = token.cancelled() => Event::Shutdown,
                exited = self.tasks.join_next_with_id() => match exited {
                    Some(exited) => Event::Exited(exited),
                    None => Event::Empty,
                },
            };
            match event {
                Event::Shutdown => {
                    tracing::info!(tasks = self.running.len(), "shutting down");
                    break;
                }
                Event::Empty => {
                    tracing::info!("every task finished");
                    break;
                }
                Event::Exited(exited) => {
                    if let Some(err) = self.exited(exited) {
                        failed = Some(err);
                        break;
                    }
                }
            }
        }
        self.token.cancel();
        let grace = self.grace;
        if tokio::time::timeout(grace, self.drain(&mut failed))
            .await
            .is_err()
        {
            let mut stuck: Vec<&'static str> = self
                .running
                .values()
                .filter_map(|&i| self.slots.get(i).map(|s| s.name))
                .collect();
            stuck.sort_unstable();
            tracing::warn!(
                tasks = ?stuck,
                grace_ms = grace.as_millis() as u64,
                "tasks did not stop within the grace period; aborting them"
            );
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
            self.running.clear();
        }
        failed.map_or(Ok(()), Err)
    }

    /// Waits for every task after cancellation, recording the first failure of a `Never` task
    /// if there was none yet.
    async fn drain(&mut self, failed: &mut Option<SupervisorError>) {
        while let Some(exited) = self.tasks.join_next_with_id().await {
            let (id, result) = split(exited);
            let Some(index) = self.running.remove(&id) else {
                continue;
            };
            let Some(slot) = self.slots.get(index) else {
                continue;
            };
            if let Err(err) = result {
                tracing::error!(task = slot.name, error = %Chain(err.as_ref()), "task failed while stopping");
                if slot.restart == Restart::Never && failed.is_none() {
                    *failed = Some(SupervisorError::TaskFailed {
                        task: slot.name,
                        source: err,
                    });
                }
            }
        }
    }

    /// Handles a task's exit before shutdown; returns the error that stops the process, if any.
    fn exited(
        &mut self,
        exited: Result<(Id, Result<(), BoxError>), JoinError>,
    ) -> Option<SupervisorError> {
        let (id, result) = split(exited);
        let index = self.running.remove(&id)?;
        let slot = self.slots.get_mut(index)?;
        let err = match result {
            Ok(()) => {
                tracing::info!(task = slot.name, "task finished");
                return None;
            }
            Err(err) => err,
        };
        slot.failures += 1;
        match slot.restart {
            Restart::Never => {
                if let Some(ready) = &slot.ready {
                    ready.set_not_ready(format!(
                        "task {} failed: {}",
                        slot.name,
                        Chain(err.as_ref())
                    ));
                }
                tracing::error!(
                    task = slot.name,
                    error = %Chain(err.as_ref()),
                    "task failed; stopping every task"
                );
                Some(SupervisorError::TaskFailed {
                    task: slot.name,
                    source: err,
                })
            }
            Restart::Backoff { min, max } => {
                let ran = Instant::now().saturating_duration_since(slot.started);
                if ran >= max {
                    slot.next_delay = min;
                }
                let delay = slot.next_delay;
                slot.next_delay = delay.saturating_mul(2).min(max);
                if let Some(ready) = &slot.ready {
                    ready.set_not_ready(format!(
                        "task {} failed: {} (restarting in {delay:?})",
                        slot.name,
                        Chain(err.as_ref())
                    ));
                }
                tracing::error!(
                    task = slot.name,
                    error = %Chain(err.as_ref()),
                    failures = slot.failures,
                    restart_in_ms = delay.as_millis() as u64,
                    "task failed; restarting"
                );
                self.start(index, delay);
                None
            }
        }
    }
}

/// A task's id and outcome; a panic is an error, an abort a clean exit (only shutdown aborts).
fn split(exited: Result<(Id, Result<(), BoxError>), JoinError>) -> (Id, Result<(), BoxError>) {
    match exited {
        Ok((id, result)) => (id, result),
        Err(e) if e.is_panic() => (e.id(), Err(Box::new(e))),
        Err(e) => (e.id(), Ok(())),
    }
}

fn boxed<F, Fut, E>(mut factory: F) -> Factory
where
    F: FnMut(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    Box::new(move |token| -> TaskFuture {
        let fut = factory(token);
        Box::pin(async move { fut.await.map_err(Into::into) })
    })
}

/// How long a server waits, once its shutdown began, for its connections to finish.
pub const CONNECTION_GRACE: Duration = Duration::from_secs(1);

/// Runs `serve`, a server whose graceful shutdown starts when `stopping` completes, but gives
/// its connections only [`CONNECTION_GRACE`] after that: a graceful shutdown waits for every
/// client to hang up, and a client holding an idle connection (an admin client, a stalled
/// agent) must not hold the process's exit up. `what` names the server in the log.
pub async fn with_connection_grace<E>(
    what: &'static str,
    serve: impl Future<Output = Result<(), E>>,
    stopping: impl Future<Output = ()>,
) -> Result<(), E> {
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => r,
        () = async {
            stopping.await;
            tokio::time::sleep(CONNECTION_GRACE).await;
        } => {
            tracing::info!(
                server = what,
                grace_ms = u64::try_from(CONNECTION_GRACE.as_millis()).unwrap_or(u64::MAX),
                "closing connections still open at shutdown"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use tokio::sync::mpsc;

    use super::*;
    use crate::Readiness;

    fn io_err(msg: &str) -> std::io::Error {
        std::io::Error::other(msg.to_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_task_is_restarted_with_doubling_capped_backoff() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut sup = Supervisor::new();
        sup.spawn(
            "flaky",
            Restart::Backoff {
                min: Duration::from_millis(100),
                max: Duration::from_millis(400),
            },
            move |_token| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(Instant::now());
                    Err(io_err("boom"))
                }
            },
        );
        let token = sup.token();
        let run = tokio::spawn(sup.run_until(std::future::pending()));
        let mut starts = Vec::new();
        for _ in 0..6 {
            starts.push(rx.recv().await.expect("another attempt"));
        }
        let gaps: Vec<u128> = starts
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis())
            .collect();
        assert_eq!(gaps, [100, 200, 400, 400, 400]);
        token.cancel();
        run.await
            .expect("no panic")
            .expect("restartable failures do not fail the run");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_falls_back_to_min_after_a_long_healthy_run() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let attempts = Arc::new(AtomicU32::new(0));
        let mut sup = Supervisor::new();
        let counter = Arc::clone(&attempts);
        sup.spawn(
            "sometimes",
            Restart::Backoff {
                min: Duration::from_millis(100),
                max: Duration::from_secs(1),
            },
            move |_token| {
                let tx = tx.clone();
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _ = tx.send(Instant::now());
                    // Attempts 0 and 1 fail at once; attempt 2 runs for 5 s first.
                    if n == 2 {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    Err(io_err("boom"))
                }
            },
        );
        let token = sup.token();
        let run = tokio::spawn(sup.run_until(std::future::pending()));
        let mut starts = Vec::new();
        for _ in 0..4 {
            starts.push(rx.recv().await.expect("another attempt"));
        }
        let gaps: Vec<u128> = starts
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis())
            .collect();
        // 100, 200, then 5 s of running plus the reset delay of 100 ms.
        assert_eq!(gaps, [100, 200, 5100]);
        token.cancel();
        run.await.expect("no panic").expect("clean");
    }

    #[tokio::test(start_paused = true)]
    async fn a_never_task_failure_stops_the_others_and_names_the_task() {
        let other_stopped = Arc::new(AtomicBool::new(false));
        let mut sup = Supervisor::new();
        let flag = Arc::clone(&other_stopped);
        sup.spawn(
            "worker",
            Restart::Backoff {
                min: Duration::from_secs(1),
                max: Duration::from_secs(1),
            },
            move |token| {
                let flag = Arc::clone(&flag);
                async move {
                    token.cancelled().await;
                    flag.store(true, Ordering::SeqCst);
                    Ok::<(), std::io::Error>(())
                }
            },
        );
        sup.spawn_once("node-api", |_token| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Err(io_err("address in use"))
        });
        let started = Instant::now();
        let err = sup
            .run_until(std::future::pending())
            .await
            .expect_err("a Never task's failure fails the run");
        assert_eq!(err.task(), "node-api");
        assert_eq!(err.to_string(), "task node-api failed");
        let source = StdError::source(&err).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("address in use"));
        assert!(
            other_stopped.load(Ordering::SeqCst),
            "the other task was cancelled and waited for"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_is_a_failure() {
        let mut sup = Supervisor::new();
        sup.spawn("panicky", Restart::Never, |_token| async {
            if std::hint::black_box(true) {
                panic!("oops");
            }
            Ok::<(), std::io::Error>(())
        });
        let err = sup
            .run_until(std::future::pending())
            .await
            .expect_err("a panic fails the run");
        assert_eq!(err.task(), "panicky");
        let source = StdError::source(&err).map(ToString::to_string);
        assert!(source.is_some_and(|s| s.contains("oops")));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_tasks_to_finish() {
        let finished = Arc::new(AtomicBool::new(false));
        let mut sup = Supervisor::new();
        let flag = Arc::clone(&finished);
        sup.spawn_once("slow-stop", move |token| async move {
            token.cancelled().await;
            // Cleaning up takes a while, within the grace period.
            tokio::time::sleep(Duration::from_secs(2)).await;
            flag.store(true, Ordering::SeqCst);
            Ok::<(), std::io::Error>(())
        });
        let started = Instant::now();
        sup.run_until(tokio::time::sleep(Duration::from_secs(1)))
            .await
            .expect("clean shutdown");
        assert!(finished.load(Ordering::SeqCst), "run_until waited");
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_is_bounded_by_the_grace_period() {
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let aborted = Arc::new(AtomicBool::new(false));
        let mut sup = Supervisor::new().with_grace(Duration::from_secs(3));
        let flag = Arc::clone(&aborted);
        sup.spawn_once("stubborn", move |_token| async move {
            let _guard = Dropped(flag);
            std::future::pending::<()>().await;
            Ok::<(), std::io::Error>(())
        });
        let started = Instant::now();
        sup.run_until(std::future::ready(()))
            .await
            .expect("a slow stop is not a failure");
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert!(aborted.load(Ordering::SeqCst), "the task was aborted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_lowers_the_tasks_readiness_and_the_retry_restores_it() {
        let readiness = Readiness::new();
        let ready = readiness.register("enforcement");
        let attempts = Arc::new(AtomicU32::new(0));
        let mut sup = Supervisor::new();
        let counter = Arc::clone(&attempts);
        let handle = ready.clone();
        sup.spawn_with_readiness(
            "enforcement",
            Restart::Backoff {
                min: Duration::from_secs(1),
                max: Duration::from_secs(1),
            },
            ready,
            move |token| {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let handle = handle.clone();
                async move {
                    if n == 0 {
                        return Err(io_err("no BTF"));
                    }
                    handle.set_ready();
                    token.cancelled().await;
                    Ok(())
                }
            },
        );
        let token = sup.token();
        let run = tokio::spawn(sup.run_until(std::future::pending()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            readiness.report(),
            "enforcement: task enforcement failed: no BTF (restarting in 1s)\n"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(readiness.is_ready(), "{}", readiness.report());
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        token.cancel();
        run.await.expect("no panic").expect("clean");
    }

    #[tokio::test]
    async fn tasks_that_finish_are_not_restarted_and_an_empty_supervisor_returns() {
        let attempts = Arc::new(AtomicU32::new(0));
        let mut sup = Supervisor::new();
        let counter = Arc::clone(&attempts);
        sup.spawn(
            "one-job",
            Restart::Backoff {
                min: Duration::from_millis(10),
                max: Duration::from_millis(10),
            },
            move |_token| {
                counter.fetch_add(1, Ordering::SeqCst);
                async { Ok::<(), std::io::Error>(()) }
            },
        );
        tokio::time::timeout(
            Duration::from_secs(5),
            sup.run_until(std::future::pending()),
        )
        .await
        .expect("returns once no task is left")
        .expect("clean");
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
    }
}
