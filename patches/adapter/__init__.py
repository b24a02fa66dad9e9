"""Every private vLLM surface steerserve touches, one module per subsystem (vLLM pinned to 0.32.0).

`tests/engine/test_vllm_adapter.py` checks each one against the installed vLLM and fails loudly when an
upgrade moves or renames it. Modules:

- `runner`: `GPUModelRunner._model_forward` (V1 runner; `CPUModelRunner` subclasses it), the call
  made once per step under `set_forward_context` after the step's inputs are final, wrapped to begin
  each step's steering (`install_runner_hook`); inside it `input_batch.req_ids` / `num_reqs`,
  `query_start_loc.np`, `requests[req_id].sampling_params.extra_args` (the plan) and
  `num_prompt_tokens`, and the runner's `attn_groups`; the CPU pipeline-parallel fix
  (`CPUModelRunner.initialize_kv_cache`, `intermediate_tensors`, `make_empty_intermediate_tensors`);
  the offline engine's shutdown.
- `layers`: vLLM's Llama/Qwen2 MLP layout (`gate_up_proj`, `act_fn`, `down_proj`) and
  `extract_layer_index`: the FFN-coefficients hook point.
- `attention`: vLLM's `Attention` layers and their `impl` (the CPU and FlashAttention impls,
  subclassed in place), `forward`'s arguments, the metadata's `seq_lens` / `block_table`, the paged
  KV cache layouts and the CPU cache-write op used to calibrate the CPU layout: the attention hook
  point.
- `metadata`: `AttentionGroup.build_metadata` (wrapped to keep each step's
  `CommonAttentionMetadata`) and that dataclass's fields (cut to a subset of requests).
- `parallel`: the tensor-parallel group (`get_tensor_model_parallel_rank` / `_world_size`,
  `tensor_model_parallel_all_gather` for InfoSteer's whole-row statistics).
- `mixing`: TAIA mixing of fully fine-tuned variants (module names, loaders, quant processing, LM head).
- `submodels`: proxy tuning's expert / anti-expert sub-models.
- `lora_cpu`: the CPU build's pure-torch multi-LoRA ops (`vllm.lora.ops.torch_ops`, imported by
  name into `punica_cpu`), wrapped so rows without an adapter (index -1) do not take the last slot's.
- `block_hash`: prefix caching's `generate_block_hash_extra_keys` and the engine-core `Request`.
- `server`: the OpenAI server's internals the API routes build on (protocol models, the stock route
  handlers, `validate_json_request`, `ErrorResponse`, `EngineClient.vllm_config`, the serving
  objects' render methods), the launcher (vLLM's argument parser and `run_server`), uvicorn's
  protocols under it (a header-read timeout), `build_app` (every served route), the engine client's
  `engine_dead`, and a vLLM 0.32 bug the completions route refuses.

Each runs in every process that loads the plugin; the runner hook only does work in the worker.
"""

WRAPPED_MARK = "_steerserve_wrapped"  # set on every function this package wraps (idempotent installs)
