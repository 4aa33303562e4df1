"""The BLIP-2 trainer: the stages (stages.py: stage 1, ITC + ITM + ITG; stage 2, generative through the
frozen LLM; VQA fine-tuning), their objectives (stage1.py, stage2.py), data and collates (data.py), the
loop with checkpoints and exact resume (trainer.py, checkpoint.py), and evaluation (evaluate.py)."""
