//! secureops-dns (work in progress: see the issue tracker).
