#!/usr/bin/env bash
# Benchmark run 14: run 13 again after the second causal-mask fix (the all-ones mask kept, decided on the host;
# run 13 showed transformers 5.17 also gives up the skip through its packed-sequence check under capture).
# GPU tests of the capture path, the timeline of a checkpointed eager and graphed Llama-3-8B 2x2048 step,
# what is alive at the memory peaks (eager vs capture), then reference / eager / graphed at 2x2048. ~7 min.
exec "$(dirname "$0")/run13.sh"
