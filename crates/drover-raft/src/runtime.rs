//! openraft's runtime for drover: tokio for tasks, timers and channels (so tokio's
//! paused clock is openraft's clock in the simulation), and a random source a test can
//! seed. openraft draws each member's election timeout from it once, at start; with
//! [`seed_this_thread`] those draws follow the seed instead of the OS, so a simulation
//! seed fixes every replica's timeout. Without a seed (every real member) each draw is
//! from the OS's entropy, as openraft's own tokio runtime does.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use openraft::async_runtime::{AsyncRuntime, TokioOneShotSender};
use openraft::{OptionalSend, TokioInstant};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

thread_local! {
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Makes openraft's random draws on this thread follow `seed` (a simulation calls it
/// once per seed, on the one thread it runs on).
pub fn seed_this_thread(seed: u64) {
    SEEDED.with(|s| *s.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

/// The runtime of [`crate::TypeConfig`]: openraft's tokio runtime with a seedable
/// random source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DroverRuntime;

impl AsyncRuntime for DroverRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = StdRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        SEEDED.with(|s| match &mut *s.borrow_mut() {
            Some(seeded) => StdRng::seed_from_u64(seeded.r#gen()),
            None => StdRng::from_entropy(),
        })
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(tx), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws() -> Vec<u64> {
        (0..4).map(|_| DroverRuntime::thread_rng().gen_range(200..400)).collect()
    }

    #[test]
    fn a_seeded_thread_draws_the_same_timeouts_for_the_same_seed() {
        std::thread::spawn(|| {
            seed_this_thread(7);
            let a = draws();
            seed_this_thread(7);
            assert_eq!(draws(), a);
            seed_this_thread(8);
            assert_ne!(draws(), a, "another seed, other draws (4 draws of 200 values)");
        })
        .join()
        .unwrap();
    }
}
