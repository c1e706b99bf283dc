//! secureops-audit (work in progress: see the issue tracker).
