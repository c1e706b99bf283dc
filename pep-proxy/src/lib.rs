//! secureops-proxy (work in progress: see the issue tracker).
