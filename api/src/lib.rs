//! gpuvm API types.
