"""The follow-up multi-GPU lab: `cifarlab lab --suite scaling` (items s1-s6, one file each).

s1 batch-size scaling on one device   per-device batch first, first*4, ... until out of memory (the run
                                      ends with status "oom": recorded, the ladder stops) or a preset cap;
                                      2nd-epoch time without the data wait (h2d + compute + update).
s2 speedup on 1, 2, 4 devices         at each per-device batch, everything counted (epoch_s); weak scaling.
s3 compute vs communication           estimate (T1 / N at equal work) and a direct measurement (a DDP
                                      communication hook timing every gradient all-reduce), side by side.
s4 all-reduce bandwidth               a standalone all-reduce of the gradient size, ring bus bandwidth.
s5 large-batch accuracy               largest per-device batch on all devices vs the baseline batch on one,
                                      then linear learning-rate scaling, then + gradual warm-up.
s6 short answers                      set_epoch, BatchNorm buffers, whether gradients alone suffice:
                                      generated from measurements (sampler orders, replica checks).

Every training point is a separate `cifarlab train` process (with --nproc N through torchrun), so
each point starts with a fresh model, a clean device and its own run folder inside the lab folder.
A "device" is one GPU, or on a machine without GPUs one CPU core: every process then gets
OMP_NUM_THREADS=1, so N processes use N cores. The standalone all-reduce benchmark is allreduce_bench.py
run under torchrun.
"""
