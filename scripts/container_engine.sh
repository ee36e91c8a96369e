#!/usr/bin/env bash
# A private Docker Engine for the container tests (tests/test_container.py), on its own socket and data folder, so it
# neither needs nor touches a system dockerd.
#
#   eval "$(scripts/container_engine.sh start)"    start it (if it is not running) and export DOCKER_HOST
#   scripts/container_engine.sh env                 print the export line
#   scripts/container_engine.sh stop [--purge]      stop it; --purge also deletes its images, containers and layers
#
# Needs root and Debian's docker.io (apt-get install docker.io; Engine 20.10). Runs as
#   dockerd --storage-driver=<overlay2|vfs> --iptables=false -H unix://$MAE_ENGINE_DIR/docker.sock ...
# --iptables=false: it leaves the machine's firewall alone; containers get no route out, and published ports work
# through Docker's userland proxy. Storage: overlay2 where the kernel and filesystem allow it (1.5 s and 1.2 GB per
# container of our image), else vfs (a full copy per layer and per container: ~30 s and several GB each);
# MAE_DOCKER_STORAGE_DRIVER=vfs forces one. State under MAE_ENGINE_DIR (default /var/tmp/mae-serve-engine).
set -euo pipefail

DIR=${MAE_ENGINE_DIR:-/var/tmp/mae-serve-engine}
SOCK="$DIR/docker.sock"
PIDFILE="$DIR/dockerd.pid"
LOG="$DIR/dockerd.log"
DRIVERS=${MAE_DOCKER_STORAGE_DRIVER:-overlay2 vfs}
say() { echo "container_engine: $*" >&2; }
up() { DOCKER_HOST="unix://$SOCK" docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
running_pid() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && cat "$PIDFILE"; }

start() {
  command -v dockerd >/dev/null || { say "dockerd is not installed (apt-get install docker.io)"; exit 3; }
  command -v docker >/dev/null || { say "the docker client is not installed (apt-get install docker.io)"; exit 3; }
  mkdir -p "$DIR"
  if up; then
    say "already running on $SOCK"
  else
    for driver in $DRIVERS; do
      # setsid: the daemon outlives this script and is not in its process group (CI stops it with `stop`).
      setsid dockerd --storage-driver="$driver" --iptables=false --ip-masq=false \
        -H "unix://$SOCK" --data-root "$DIR/data" --exec-root "$DIR/exec" --pidfile "$PIDFILE" \
        >"$LOG" 2>&1 </dev/null &
      local pid=$!
      for _ in $(seq 1 60); do
        up && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
      done
      if up; then
        say "dockerd $(DOCKER_HOST="unix://$SOCK" docker version --format '{{.Server.Version}}') on $SOCK" \
          "(storage $driver, pid $pid, log $LOG)"
        break
      fi
      say "dockerd with storage $driver did not start; its log:"
      tail -5 "$LOG" >&2
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    done
    up || { say "no storage driver worked ($DRIVERS)"; exit 1; }
  fi
  echo "export DOCKER_HOST=unix://$SOCK"
}

stop() {
  local pid
  if pid=$(running_pid); then
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then say "dockerd $pid did not stop in 30 s: killing it"; kill -9 "$pid"; fi
    say "stopped dockerd $pid"
  else
    say "not running"
  fi
  if [ "${1:-}" = --purge ] && [ -d "$DIR" ]; then
    # Mounts a killed daemon may have left (container layers, shm), innermost first, before deleting.
    findmnt -rn -o TARGET | { grep "^$DIR/" || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
    rm -rf "$DIR"
    say "deleted $DIR"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) shift; stop "$@" ;;
  env) echo "export DOCKER_HOST=unix://$SOCK" ;;
  *) echo "usage: $0 start | env | stop [--purge]" >&2; exit 2 ;;
esac
