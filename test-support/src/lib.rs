//! secureops-test-support (work in progress: see the issue tracker).
