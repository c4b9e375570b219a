//! How zvmm starts its threads: [`spawn`] is `std::thread::Builder::spawn`
//! with a name, going through the [`ThreadStarter`] the VMM installed once
//! per process (its sandbox: the new thread is created by an unconfined
//! launcher thread, so it inherits no other thread's seccomp filter or
//! Landlock domain, and installs its own kind's first thing). Without a
//! starter (unit tests, library users that confine nothing) threads start
//! directly. Device workers use it so the `devices` crate needs nothing
//! from `vmm`.

use std::io;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread::{self, JoinHandle};

/// A job run on the launcher thread.
pub type LaunchJob = Box<dyn FnOnce() + Send>;

/// The VMM's hook into thread creation.
pub trait ThreadStarter: Send + Sync {
    /// Runs `job` on the thread that creates new threads (it calls
    /// `std::thread::Builder::spawn` there).
    fn launch(&self, job: LaunchJob);
    /// Runs first thing on a new thread named `name`, before its body
    /// (installs that kind of thread's confinement).
    fn on_start(&self, name: &str);
}

static STARTER: OnceLock<Box<dyn ThreadStarter>> = OnceLock::new();

/// Installs the process's thread starter; false if one was installed
/// already (the first stays).
pub fn set_starter(starter: Box<dyn ThreadStarter>) -> bool {
    STARTER.set(starter).is_ok()
}

/// Starts a thread named `name` running `body`, through the installed
/// starter if there is one.
pub fn spawn<T, F>(name: String, body: F) -> io::Result<JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let Some(starter) = STARTER.get() else {
        return thread::Builder::new().name(name).spawn(body);
    };
    let (sender, receiver) = mpsc::channel();
    starter.launch(Box::new(move || {
        let started = thread::Builder::new().name(name.clone()).spawn(move || {
            if let Some(starter) = STARTER.get() {
                starter.on_start(&name);
            }
            body()
        });
        let _ = sender.send(started);
    }));
    receiver
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the thread launcher has ended")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    static STARTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

    /// Runs launch jobs inline and records which threads started.
    struct Recorder;

    impl ThreadStarter for Recorder {
        fn launch(&self, job: LaunchJob) {
            job();
        }
        fn on_start(&self, name: &str) {
            STARTED.lock().unwrap().push(name.to_string());
        }
    }

    #[test]
    fn threads_start_through_the_starter_and_run_their_body_under_their_name() {
        set_starter(Box::new(Recorder));
        let handle = spawn("blk-test".into(), || {
            let started = STARTED.lock().unwrap().contains(&"blk-test".to_string());
            (thread::current().name().map(str::to_string), started)
        })
        .unwrap();
        let (name, started_first) = handle.join().unwrap();
        assert_eq!(name.as_deref(), Some("blk-test"));
        assert!(started_first, "on_start must run before the body");
        assert!(!set_starter(Box::new(Recorder)), "the first starter stays");
    }
}
