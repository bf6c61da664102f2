"""The forward pass of a tuned model: label scoring, batched prediction, the cached prompt head,
greedy decoding and the lean SwiGLU backward. Models come loaded (tunelab/models)."""
