//! Unit tests of the wire format.
