//! (lands with its issue work)
