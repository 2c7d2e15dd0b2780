#!/bin/bash
M=/work/main/.build/release/memvirt
out=$1; mkdir -p $out
for r in 1 2 3 4 5 6; do
  $M kvm probe --json > $out/probe-$r.json 2>/dev/null
  for wr in 1 0; do
   $M kvm run --workload strided:4096 --footprint 64MiB --accesses 16384 --write-ratio $wr --seed 11 --json > $out/s-wr$wr-$r.json
  done
  $M kvm run --workload strided:4096 --footprint 8MiB --accesses 2048 --write-ratio 1 --seed 11 --json > $out/small-$r.json
done
