# Llama-2-7B (window 4k) -> 32k with PoSE + linear interpolation (factor 32768 / 4096 = 8) on ONE
# GPU: LoRA+ (LongLoRA's recipe: rank 8, alpha 16 on q, k, v, o, plus trainable embeddings and
# norms) on bf16 frozen weights, instead of full fine-tuning on 8 GPUs. The export out_dir/hf is a
# plain checkpoint (the adapters merged). 24 GB GPU: --train_len=2048 --target_len=16384.
#   python train.py config/pose_lora_7b_1gpu.py
# Memory (GB = 1e9 bytes; Llama-2-7B: 6.74B parameters, 32 layers, dim 4096, vocab 32000 untied):
#   frozen weights, bf16: 6.48B x 2 B                                         12.95
#   trainable, rank 8: 8.4M adapters + 262.1M embeddings/lm_head + 0.3M norms = 270.8M (rank 16:
#     279.2M), each fp32 weight 4 B + grad 4 B + AdamW moments 8 B = 16 B      4.33 (rank 16: 4.47)
#   activations, checkpointed: fp32 block inputs 32 x L_c x 4096 x 4 B, one block recomputed,
#     the chunked loss                                                L_c 2k ~2.5, L_c 4k ~4.5
#   CUDA context, workspaces                                                    ~1
#   total: L_c 2k ~21 (fits 24 GB), L_c 4k ~23 (40 / 80 GB; too tight for 24). Full fine-tuning:
#     fp32 weights + grads + AdamW = 108 GB before activations: no single GPU.
exec(open('config/pose_16k.py').read())
init_from = 'checkpoints/llama-2-7b'  # placeholder: an HF-format Llama-2-7B dir
data_dir = 'data-pile-llama2'  # as config/pose_llama2_4k_16k.py prepares it
out_dir = 'out-pose-lora-7b-32k'
train_len = 4096  # L_c: Llama 2's own window
target_len = 32768  # L_t
lora_rank = 8
lora_alpha = 16.0
lora_targets = ['q', 'k', 'v', 'o']
train_embeddings_norms = True  # LoRA+: plain LoRA leaves a long-context perplexity gap (LongLoRA)
batch_size = 1
gradient_accumulation_steps = 64  # the paper's global batch of 64, on one GPU
learning_rate = 2e-5  # LongLoRA's for 7B, full and LoRA+ alike
