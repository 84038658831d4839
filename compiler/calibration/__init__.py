"""Calibration: run the model once on the CPU over sample inputs and collect, for each linear layer the
weight plan compresses, statistics of that layer's input activations. The one calibration path of the
project: pruning (wanda, sparsegpt), FPx's `act` scale search and int2-oscar's KV rotations
(`kv_rotations.py`: its accumulator takes the attention's input and folds the query and value
covariances) read it.

    data  = read_calibration_file("calib.npz")                  # checked before any work (samples.py)
    feeds = calibration_feeds(data, imported)                   # {input name: array} per sample
    stats = linear_input_statistics(imported, feeds, weights)   # {weight name: LinearInputStatistics}
    packed = compress_in_order(imported, feeds, weights, compress)   # level by level (collect.py)

The file (`--calibration FILE`, `tensorpress.compile(..., calibration=FILE)`):
  .npz  model inputs by input name (np.savez(f, input_ids=..., attention_mask=...)). Each array is
        either one sample, shaped like the input (rank, dtype and fixed sizes as the model declares),
        or several, [S, *input shape] with S the same for every input; sample i is array[i]. Every
        input of the model must be there, and nothing else.
  .txt  text, one sample per non-empty line, for models with a tokenizer (a Hugging Face folder):
        each line is tokenized alone (no padding), input_ids from the tokenizer, attention_mask ones,
        token_type_ids zeros, position_ids 0 .. L-1.
  Decoders (Hugging Face folders) take prompts: a .txt through their tokenizer, or an .npz holding
  only input_ids, one prompt [n] or [S, n]. They run through `prefill`, all prompts of a batch as one
  ragged call over a scratch KV cache (prefill_arguments.py), attending in full precision as served.

How (collect.py): the imported Relax module, where every frontend ends, gets each linear site's input
expression as an extra output (`expose_linear_inputs`), is built for the CPU by the normal build and
run by TVM's VM one sample at a time; the accumulators (statistics.py) fold each sample's [tokens, K]
activations in float64 and nothing else is kept. The compiler compresses level by level
(`compress_in_order`): a layer's statistics are taken with the layers feeding it already compressed
(the weights are VM arguments: one build, a run per level). One path for ONNX, torch and Hugging Face models
alike, the same graph the compiler then rewrites, so a site's statistics are of exactly the tensor
its weight GEMM will multiply. (ONNX decoders are not calibrated: compile their Hugging Face folder.)
"""

from tensorpress.compiler.calibration.collect import (
    CalibrationRun,
    compress_in_order,
    expose_linear_inputs,
    linear_input_statistics,
)
from tensorpress.compiler.calibration.samples import CalibrationData, calibration_feeds, read_calibration_file
from tensorpress.compiler.calibration.statistics import LinearInputStatistics

__all__ = [
    "CalibrationData",
    "CalibrationRun",
    "LinearInputStatistics",
    "calibration_feeds",
    "compress_in_order",
    "expose_linear_inputs",
    "linear_input_statistics",
    "read_calibration_file",
]
