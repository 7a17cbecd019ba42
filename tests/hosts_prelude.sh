# Sourced by the tests on simulated hosts (test_hosts.sh, test_hosts_faults.sh), with $src set to
# the clone: skips (exit 77) where they cannot run (not root, a tool missing, network namespaces
# refused), makes $tmp and $cluster (its state folder), and on exit stops the cluster and removes
# $tmp (KEEP=1 keeps it).
[ "$(id -u)" -eq 0 ] || { echo "skipped: simulated hosts need root (network namespaces)"; exit 77; }
for p in mpirun sbatch /usr/sbin/slurmctld /usr/sbin/munged ip unshare; do
  command -v "$p" >/dev/null || { echo "skipped: $p is not installed (scripts/setup installs it)"; exit 77; }
done
ip netns add "coil-probe-$$" 2>/dev/null || { echo "skipped: network namespaces are refused here"; exit 77; }
ip netns del "coil-probe-$$"
tmp=$(mktemp -d)
cluster=$tmp/cluster
trap '"$src/slurm/local-cluster" stop "$cluster" >/dev/null 2>&1; [ "${KEEP:-0}" = 1 ] || rm -rf "$tmp"' EXIT
