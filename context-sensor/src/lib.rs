//! secureops-sensor (work in progress: see the issue tracker).
