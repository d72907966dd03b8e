//! The elementary functions whose bits decide a response, written out here
//! rather than taken from the C library: glibc picks among several builds
//! of them by CPU, is replacing some with correctly rounded ones, and other
//! systems have their own, so a response computed with them could depend
//! on the machine. Each is a port of glibc 2.36's x86-64 build (the same
//! IEEE operations in the same order, fused where that build fuses them),
//! checked against it bit for bit, and each has an AVX2 version that runs
//! the same operations in lanes, several values a call: scalar calls into
//! the C library were a quarter of a Gemma-3 prefill.

pub mod exp;
pub mod expf;
pub mod gelu;
