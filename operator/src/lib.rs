//! gpuvm operator.
