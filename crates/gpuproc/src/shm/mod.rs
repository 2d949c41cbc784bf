//! Memory shared between processes: values, arrays and named blocks.
