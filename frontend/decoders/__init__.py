"""Our definitions of decoder LLM families (tvm.relax.frontend.nn), loaded with Hugging Face weights."""
