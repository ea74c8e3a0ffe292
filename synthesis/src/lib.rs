//! VM synthesis flows composed from the overlay format, delta engine, driver and registry.
#![deny(missing_docs)]
