#!/bin/sh
# gpusentry's Slurm epilog: forget the job's GPU record (see prolog.sh).
set -eu
dir="${GPUSENTRY_SLURM_MAP_DIR:-/run/gpusentry/slurm}"
job="${SLURM_JOB_ID:?SLURM_JOB_ID is not set: run this as a Slurm Epilog}"
case "$job" in *[!0-9A-Za-z_]*) exit 0 ;; esac
rm -f "$dir/$job.json"
exit 0
