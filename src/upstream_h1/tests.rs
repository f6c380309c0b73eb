//! Unit tests of the fast-path HTTP/1.1 exchange.
