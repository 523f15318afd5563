#!/bin/sh
# gpusentry's Slurm prolog: record which GPUs (by UUID) this job was given on this node, for the agent's
# [agent.scheduler] slurm source. slurmd runs it as root when the job starts (Prolog= in slurm.conf, or
# include it from your own prolog); the file is root-owned, so the job's user cannot rewrite it.
#   SLURM_JOB_ID, SLURM_JOB_USER, SLURM_JOB_GPUS (NVML indices, comma-separated) are set by slurmd.
#   GPUSENTRY_SLURM_MAP_DIR overrides the directory (default /run/gpusentry/slurm, the agent's default).
#   Slurm runs prologs with no search path: nvidia-smi is looked for in the usual places. PrologFlags=Alloc
#   runs it when the job is allocated rather than at its first step.
set -eu
PATH="${PATH:-/usr/bin:/bin}:/usr/bin:/bin:/usr/local/bin"
export PATH
dir="${GPUSENTRY_SLURM_MAP_DIR:-/run/gpusentry/slurm}"
job="${SLURM_JOB_ID:?SLURM_JOB_ID is not set: run this as a Slurm Prolog}"
case "$job" in *[!0-9A-Za-z_]*) echo "gpusentry prolog: odd job id '$job'" >&2; exit 0 ;; esac
gpus="${SLURM_JOB_GPUS:-}"
uuids=""
if [ -n "$gpus" ]; then
    # Slurm and NVML both number GPUs by PCI bus id, so Slurm's indices are nvidia-smi's.
    uuids=$(nvidia-smi --query-gpu=uuid --format=csv,noheader -i "$gpus" | tr -d ' ' | sed 's/.*/"&"/' | paste -sd, -)
fi
user=$(printf '%s' "${SLURM_JOB_USER:-}" | tr -cd '0-9A-Za-z._-')
name=$(printf '%s' "${SLURM_JOB_NAME:-}" | tr -cd '0-9A-Za-z._-')
mkdir -p "$dir"
chmod 0755 "$dir"
tmp="$dir/.$job.json.tmp"
printf '{"job_id":"%s","user":"%s","job_name":"%s","gpu_uuids":[%s]}\n' "$job" "$user" "$name" "$uuids" > "$tmp"
chmod 0644 "$tmp"
mv -f "$tmp" "$dir/$job.json"
exit 0
