//! Shared memory mappings (memfd, mmap) and futexes.
