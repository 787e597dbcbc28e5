#!/usr/bin/env bash
# The container stack, built and run for real (issue 11, item 9).
#
# As root on a Debian bookworm machine that reaches Debian's and PyPI's
# package registries and no image registry:
#   - installs Debian's docker.io and mmdebstrap, and Compose v2 (trixie's
#     docker-compose package, unpacked into a private directory);
#   - starts its own dockerd (own socket, data root, exec root and pidfile) and
#     stops it by its pid at the end;
#   - makes a stand-in TensorFlow base image without a registry (mmdebstrap,
#     docker import, deploy/ci/tf-base.Dockerfile), kept between runs on the
#     same machine under a tag keyed by its inputs' hash;
#   - builds deploy/Dockerfile unchanged but for TF_IMAGE, and Prometheus from
#     Debian's package (deploy/ci/prometheus.Dockerfile);
#   - brings up trainer and prometheus with the CPU override and checks them
#     (health, loopback ports, NCCL settings, scrape target, alert rules, a
#     synthetic job through the published port, `down -v` leaving nothing),
#     and that without the CPU override `up` fails naming the nvidia driver.
#
# Prints one line per stage with its time; writes build/containers/result.json
# (each check: passed, seconds, detail), which tests/test_containers.py reads,
# and build/containers/transcript.log with every command's output.
# Only loopback is ever addressed: the stack publishes its ports on 127.0.0.1.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

OUT_DIR=$REPO/build/containers
RESULT=$OUT_DIR/result.json
TRANSCRIPT=$OUT_DIR/transcript.log
CHECKS=$OUT_DIR/checks.tsv
RUN_DIR=/tmp/ntrain-ci-docker        # socket, exec root, pidfile, daemon log
CACHE_DIR=/var/cache/ntrain-ci       # kept between runs: images, Compose v2
DATA_ROOT=$CACHE_DIR/docker
COMPOSE_DIR=$CACHE_DIR/compose
COMPOSE=$COMPOSE_DIR/usr/libexec/docker/cli-plugins/docker-compose
DOCKER=/usr/bin/docker               # Debian's client, the daemon's version
PROJECT=ntrainci$(date +%s)$$        # a unique compose project name
GPU_PROJECT=${PROJECT}gpu
TF_BASE_REPO=ntrain-ci/tf-base
DEBIAN_IMAGE=ntrain-ci/debian:bookworm
PROMETHEUS_IMAGE=ntrain-ci/prometheus:debian  # named in deploy/ci/docker-compose.ci.yml
ROOTFS=$RUN_DIR/bookworm.tar
HEALTH_SECONDS=180
SCRAPE_SECONDS=90
JOB_SECONDS=300

export DOCKER_HOST=unix://$RUN_DIR/docker.sock
export DOCKER_CONFIG=$RUN_DIR/client-config  # not root's ~/.docker (proxies, credential helpers)
export DOCKER_BUILDKIT=1
export DEBIAN_FRONTEND=noninteractive
# NTRAIN_VERSION unset: the compose file's default tag must be the one built here.
unset COMPOSE_FILE COMPOSE_PROFILES COMPOSE_PROJECT_NAME NTRAIN_VERSION
# The image's tag: the package's version, as deploy/docker-compose.yml names it.
IMAGE=ntrain:$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')

COMPOSE_CPU=(-f deploy/docker-compose.yml -f deploy/docker-compose.cpu.yml -f deploy/ci/docker-compose.ci.yml)
COMPOSE_GPU=(-f deploy/docker-compose.yml -f deploy/ci/docker-compose.ci.yml)

broken=""        # the setup step that failed; the steps after it do not run
dockerd_pid=""
made_docker0=""
memlock_settable=true
apt_updated=""
tf_base_cached=false

elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

# record NAME PASSED SECONDS DETAIL: one row of the result, one line of the transcript.
record() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\n'/ }" >>"$CHECKS"
    local mark=PASS
    [ "$2" = true ] || mark=FAIL
    printf '[%6ss] %-4s %s%s\n' "$3" "$mark" "$1" "${4:+  ($4)}"
}

# run KIND NAME FUNCTION: time FUNCTION, its output into the transcript. A failed
# `setup` stops the steps after it; a failed `check` is recorded and the rest go on.
run() {
    local kind=$1 name=$2 fn=$3 t0 t1 status detail
    if [ -n "$broken" ]; then
        record "$name" false 0 "not run: $broken failed"
        return 1
    fi
    DETAIL=""
    t0=$(date +%s.%N)
    { printf '\n=== %s\n' "$name"; } >>"$TRANSCRIPT"
    local first_line
    first_line=$(wc -l <"$TRANSCRIPT")
    "$fn" >>"$TRANSCRIPT" 2>&1
    status=$?
    t1=$(date +%s.%N)
    detail=$DETAIL
    if [ $status -eq 0 ]; then
        record "$name" true "$(elapsed "$t0" "$t1")" "$detail"
    else
        # Without a detail of its own, the step's first line that reports an error.
        [ -n "$detail" ] || detail=$(tail -n +"$((first_line + 1))" "$TRANSCRIPT" |
            grep -m 1 -E 'Error:|ERROR:|error:|Error response')
        record "$name" false "$(elapsed "$t0" "$t1")" "${detail:-exit status $status}"
        echo "         --- last lines of $name (all in $TRANSCRIPT):"
        tail -n 25 "$TRANSCRIPT" | sed 's/^/         | /'
        [ "$kind" = setup ] && broken=$name
    fi
    return $status
}

# in_background NAME FUNCTION: start FUNCTION now, beside the steps that follow;
# `run KIND TITLE await_NAME` later waits for it and records it as a step.
declare -A bg_pid bg_log
in_background() {
    local name=$1 fn=$2
    bg_log[$name]=$OUT_DIR/background-$name.log
    (
        trap - EXIT INT TERM
        t0=$(date +%s.%N)
        "$fn"
        status=$?
        printf '%s\n%s' "$(elapsed "$t0" "$(date +%s.%N)")" "$DETAIL" >"${bg_log[$name]}.detail"
        exit $status
    ) >"${bg_log[$name]}" 2>&1 9>&- &
    bg_pid[$name]=$!
}

# await NAME: its output into the transcript; DETAIL says how long it took.
await() {
    local name=$1 status
    wait "${bg_pid[$name]}"
    status=$?
    unset "bg_pid[$name]"
    cat "${bg_log[$name]}"
    if [ -f "${bg_log[$name]}.detail" ]; then
        DETAIL="$(tail -n +2 "${bg_log[$name]}.detail") [in the background, $(head -n 1 "${bg_log[$name]}.detail")s]"
    fi
    rm -f "${bg_log[$name]}" "${bg_log[$name]}.detail"
    return $status
}

compose() { "$COMPOSE" --project-directory deploy "$@"; }

# --- setup -----------------------------------------------------------------------------------

preflight() {
    [ "$(id -u)" = 0 ] || { DETAIL="must run as root"; return 1; }
    local other
    other=$(pgrep -a -x dockerd)
    if [ -n "$other" ]; then
        # This script runs its own daemon; a second one would share docker0 and
        # the DOCKER iptables chains with it. Leave that daemon alone.
        DETAIL="a dockerd not started by this run is running: $other"
        return 1
    fi
    # runc sets the trainer's `memlock: -1` only if root may raise that limit.
    if ! sh -c 'prlimit --pid $$ --memlock=unlimited:unlimited' 2>/dev/null; then
        memlock_settable=false
        COMPOSE_CPU+=(-f deploy/ci/docker-compose.host-memlock.yml)
        COMPOSE_GPU+=(-f deploy/ci/docker-compose.host-memlock.yml)
        DETAIL="root cannot raise the memlock limit here; the trainer keeps the host's ($(ulimit -Hl) KB)"
    fi
    local port
    for port in 50051 9101 9090; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            DETAIL="127.0.0.1:$port is in use; the compose file publishes it"
            return 1
        fi
    done
}

# apt_install COMMAND PACKAGE: install Debian's PACKAGE unless COMMAND is there.
apt_install() {
    if command -v "$1" >/dev/null; then
        DETAIL="already there"
        return 0
    fi
    if [ -z "$apt_updated" ]; then
        apt-get update -qq || return 1
        apt_updated=1
    fi
    # No init system runs here, but if the machine has no policy-rc.d, keep the
    # package from starting a service (a system dockerd) this script did not ask for.
    local made_policy="" status
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "$2"
    status=$?
    [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
    DETAIL="installed $2"
    return $status
}

install_mmdebstrap() { apt_install mmdebstrap mmdebstrap && DETAIL="$(mmdebstrap --version), $DETAIL"; }
install_docker() { apt_install dockerd docker.io && DETAIL="$(dockerd --version | cut -d, -f1), $DETAIL"; }

# The host's Debian mirror, as its apt sources name it, for mmdebstrap and trixie.
debian_mirror() {
    . /etc/os-release
    apt-get indextargets --format '$(REPO_URI)' "Codename: $VERSION_CODENAME" 'Identifier: Packages' |
        head -n 1
}

# Compose v2 (2.24 or newer reads the CPU override's `!reset`) is trixie's
# docker-compose package. Bookworm's is 1.29, which tests/test_deploy.py uses, so
# the trixie package is fetched by a private apt configuration (signed by
# Debian's archive key, which bookworm's keyring holds) and unpacked into
# $COMPOSE_DIR: the machine's sources, pins and installed packages stay as they are.
install_compose() {
    if [ ! -x "$COMPOSE" ]; then
        local apt_dir=$CACHE_DIR/trixie-apt mirror
        mirror=$(debian_mirror)
        [ -n "$mirror" ] || { DETAIL="no Debian mirror in the host's apt sources"; return 1; }
        rm -rf "$apt_dir" "$COMPOSE_DIR"
        mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$COMPOSE_DIR"
        printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: %s\n' \
            "$mirror" /usr/share/keyrings/debian-archive-keyring.gpg >"$apt_dir/trixie.sources"
        local opts=(-o "Dir::Etc::SourceList=$apt_dir/trixie.sources" -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir" -o APT::Sandbox::User=root)
        apt-get "${opts[@]}" update -qq || return 1
        (cd "$apt_dir/archives" && apt-get "${opts[@]}" download docker-compose) || return 1
        dpkg-deb -x "$apt_dir"/archives/docker-compose_*.deb "$COMPOSE_DIR" || return 1
        rm -rf "$apt_dir"
    fi
    local version
    version=$("$COMPOSE" version --short) || return 1
    DETAIL="docker compose $version"
    # `!reset` needs 2.24 or newer.
    python3 -c "import sys; v = tuple(map(int, sys.argv[1].split('.')[:2])); sys.exit(v < (2, 24))" \
        "$version" || { DETAIL+=" is older than 2.24"; return 1; }
}

client_venv() {
    make -s .venv/.installed-stamp && DETAIL=$(.venv/bin/ntrain --version)
}

start_dockerd() {
    mkdir -p "$RUN_DIR/exec" "$DOCKER_CONFIG" "$DATA_ROOT"
    ip link show docker0 >/dev/null 2>&1 || made_docker0=1
    # Its own containerd namespaces too, in case a system containerd is found.
    dockerd --host "$DOCKER_HOST" --data-root "$DATA_ROOT" --exec-root "$RUN_DIR/exec" \
        --pidfile "$RUN_DIR/dockerd.pid" --containerd-namespace ntrain-ci \
        --containerd-plugins-namespace ntrain-ci-plugins --log-level warn \
        >"$RUN_DIR/dockerd.log" 2>&1 </dev/null 9>&- &
    dockerd_pid=$!
    local i
    for i in $(seq 60); do
        if "$DOCKER" version --format '{{.Server.Version}}' 2>/dev/null; then
            DETAIL="pid $dockerd_pid, $DOCKER_HOST"
            return 0
        fi
        kill -0 "$dockerd_pid" 2>/dev/null || break
        sleep 1
    done
    cat "$RUN_DIR/dockerd.log"
    DETAIL="dockerd did not answer"
    return 1
}

# The host's extra trusted CA certificates, as update-ca-certificates finds them.
EXTRA_CA_DIR=/usr/local/share/ca-certificates
extra_ca_files() { find "$EXTRA_CA_DIR" -type f -name '*.crt' 2>/dev/null | sort; }

# The tag of the stand-in base: a hash of everything that goes into it.
tf_base_tag() {
    { cat deploy/ci/tf-base.Dockerfile; extra_ca_files | xargs -r cat; } | sha256sum | cut -c1-16
}

# The Debian root file system of the stand-in images, as a tarball.
make_rootfs() {
    rm -f "$ROOTFS"
    # force-unsafe-io: dpkg skips its fsyncs, here and (the option stays in the
    # image, as in Debian's own container images) in apt runs on top of it.
    # policy-rc.d: packages installed in images built on this start no services.
    mmdebstrap --variant=minbase --mode=root --dpkgopt=force-unsafe-io \
        --customize-hook='printf "#!/bin/sh\nexit 101\n" > "$1/usr/sbin/policy-rc.d"; chmod 755 "$1/usr/sbin/policy-rc.d"' \
        bookworm "$ROOTFS" "$(debian_mirror)" </dev/null || return 1
    DETAIL="$(du -h "$ROOTFS" | cut -f1) from mmdebstrap"
}

debian_image() {
    if "$DOCKER" image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
        [ -n "${bg_pid[rootfs]:-}" ] && await rootfs >/dev/null
        rm -f "$ROOTFS"
        DETAIL="cached"
        return 0
    fi
    if [ -n "${bg_pid[rootfs]:-}" ]; then
        await rootfs || return 1
    else
        make_rootfs || return 1
    fi
    "$DOCKER" import "$ROOTFS" "$DEBIAN_IMAGE" || return 1
    rm -f "$ROOTFS"
}

# Proxy settings of the host, if any, for builds that reach PyPI (Docker predefines these ARGs).
proxy_build_args() {
    local name
    for name in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
        [ -n "${!name:-}" ] && printf -- '--build-arg\n%s\n' "$name"
    done
}

tf_base_image() {
    local tag
    tag=$TF_BASE_REPO:$(tf_base_tag)
    TF_IMAGE=$tag
    if "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
        tf_base_cached=true
        DETAIL="$tag, cached"
        return 0
    fi
    local context proxy_args
    context=$(mktemp -d)
    mkdir "$context/ca-certificates"
    [ -d "$EXTRA_CA_DIR" ] && cp -r "$EXTRA_CA_DIR/." "$context/ca-certificates/"
    mapfile -t proxy_args < <(proxy_build_args)
    "$DOCKER" build --progress plain -f deploy/ci/tf-base.Dockerfile \
        --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" "${proxy_args[@]}" -t "$tag" "$context" || return 1
    rm -rf "$context"
    # Older stand-ins (other inputs) are dropped, so the data root does not grow.
    "$DOCKER" images --format '{{.Repository}}:{{.Tag}}' "$TF_BASE_REPO" | grep -vxF "$tag" |
        xargs -r "$DOCKER" rmi
    DETAIL="$tag, built"
}

prometheus_image() {
    local context
    context=$(mktemp -d)
    "$DOCKER" build --progress plain -f deploy/ci/prometheus.Dockerfile \
        --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" -t "$PROMETHEUS_IMAGE" "$context" || return 1
    rmdir "$context"
    DETAIL=$("$DOCKER" run --rm "$PROMETHEUS_IMAGE" --version 2>&1 | head -n 1)
}

ntrain_image() {
    local proxy_args
    mapfile -t proxy_args < <(proxy_build_args)
    # deploy/Dockerfile as it is; only its base is the stand-in.
    "$DOCKER" build --progress plain -f deploy/Dockerfile --build-arg TF_IMAGE="$TF_IMAGE" \
        "${proxy_args[@]}" -t "$IMAGE" . || return 1
    local user env
    user=$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")
    env=$("$DOCKER" image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE")
    DETAIL="$IMAGE, user $user"
    [ "$user" = 10001:10001 ] || { DETAIL+=", not 10001:10001"; return 1; }
    grep -qx CUDA_DEVICE_ORDER=PCI_BUS_ID <<<"$env" || { DETAIL+=", no CUDA_DEVICE_ORDER=PCI_BUS_ID"; return 1; }
    DETAIL+=", CUDA_DEVICE_ORDER=PCI_BUS_ID"
}

# The stack runs as shipped: TLS, tokens and a closed metrics endpoint, from the
# compose secrets deploy/make-certs.sh makes (the README's first secure run).
SECRETS=deploy/secrets
secrets() {
    NTRAIN=.venv/bin/ntrain deploy/make-certs.sh "$REPO/$SECRETS" || return 1
    DETAIL="CA, server certificate, tokens and metrics password in $SECRETS"
}

# Compose v2 validates each way the stack is run (no daemon needed): the GPU
# stack, with its dcgm profile, and the CPU override, which Compose 1.29 cannot read.
compose_config() {
    local files
    for files in "-f deploy/docker-compose.yml" \
        "-f deploy/docker-compose.yml -f deploy/docker-compose.cpu.yml"; do
        # shellcheck disable=SC2086  # the file flags split on purpose
        compose $files --profile dcgm config -q || { DETAIL="invalid: $files"; return 1; }
    done
    DETAIL="docker-compose.yml alone and with docker-compose.cpu.yml, profile dcgm: valid"
}

compose_up() {
    # The images are built above; nothing is built or pulled here.
    compose -p "$PROJECT" "${COMPOSE_CPU[@]}" up -d --no-build --pull never trainer prometheus
}

# --- checks ----------------------------------------------------------------------------------

container_id() { compose -p "$PROJECT" "${COMPOSE_CPU[@]}" ps -q "$1"; }

trainer_healthy() {
    local id status start=$SECONDS
    id=$(container_id trainer)
    [ -n "$id" ] || { DETAIL="no trainer container"; return 1; }
    while [ $((SECONDS - start)) -lt "$HEALTH_SECONDS" ]; do
        status=$("$DOCKER" inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$id")
        case $status in
            "running healthy")
                DETAIL="healthy $((SECONDS - start))s after up, by the image's HEALTHCHECK"
                DETAIL+=" $("$DOCKER" inspect -f '{{json .Config.Healthcheck.Test}}' "$id")"
                return 0 ;;
            "running unhealthy" | exited* | dead*) break ;;
        esac
        sleep 1
    done
    "$DOCKER" inspect -f '{{json .State.Health}}' "$id"
    "$DOCKER" logs --tail 50 "$id"
    DETAIL="trainer is '$status'"
    return 1
}

ports_on_loopback() {
    local service id bindings binding
    for service in trainer prometheus; do
        id=$(container_id "$service")
        bindings=$("$DOCKER" inspect -f '{{range $p, $b := .NetworkSettings.Ports}}{{range $b}}{{$p}}={{.HostIp}}:{{.HostPort}} {{end}}{{end}}' "$id")
        DETAIL+="$service ${bindings% }; "
        [ -n "$bindings" ] || return 1
        for binding in $bindings; do
            [[ $binding == *=127.0.0.1:* ]] || { DETAIL+="$binding is not on loopback"; return 1; }
        done
    done
    DETAIL=${DETAIL%; }
}

nccl_settings() {
    local id settings expected="8589934592 memlock=-1:-1 stack=67108864:67108864"
    id=$(container_id trainer)
    settings=$("$DOCKER" inspect -f '{{.HostConfig.ShmSize}} {{range .HostConfig.Ulimits}}{{.Name}}={{.Soft}}:{{.Hard}} {{end}}' "$id")
    DETAIL="shm_size, ulimits: ${settings% }"
    if [ "$memlock_settable" = false ]; then
        expected="8589934592 stack=67108864:67108864"
        DETAIL+=" (memlock not set: root cannot raise it on this host)"
    fi
    [ "${settings% }" = "$expected" ] || return 1
    # And what the trainer's processes see: /dev/shm size in KB, memlock, stack.
    local inside
    inside=$("$DOCKER" exec "$id" sh -c 'df -k --output=size /dev/shm | tail -n 1; ulimit -l; ulimit -s') ||
        return 1
    DETAIL+="; inside: /dev/shm, memlock, stack = $(xargs <<<"$inside")"
}

prometheus_target_up() {
    DETAIL=$(.venv/bin/python .ci/containers_checks.py target-up http://127.0.0.1:9090 \
        --job ntrain --timeout "$SCRAPE_SECONDS" 2>&1)
}

alert_rules_loaded() {
    DETAIL=$(.venv/bin/python .ci/containers_checks.py rules-loaded http://127.0.0.1:9090 \
        deploy/prometheus/alerts.yml 2>&1)
}

synthetic_job() {
    local output status
    # Over TLS, with the trainer principal's token, as a user of the stack would.
    output=$(timeout "$JOB_SECONDS" .venv/bin/ntrain train --dataset synthetic --epochs 1 \
        --address 127.0.0.1:50051 --tls-ca "$SECRETS/ca.crt" \
        --token-file "$SECRETS/trainer.token" 2>&1)
    status=$?
    echo "$output"
    DETAIL=$(grep -m1 -o '^job [^ ]* submitted' <<<"$output")
    DETAIL+="; $(grep -m1 '^result:' <<<"$output"); $(tail -n 1 <<<"$output" | tr -s ' ')"
    [ $status -eq 0 ] && grep -q 'SUCCEEDED$' <<<"$output"
}

compose_down() {
    compose -p "$PROJECT" "${COMPOSE_CPU[@]}" down -v --timeout 30
}

# nothing_left PROJECT: no container, volume or network of that compose project.
nothing_left() {
    local filter=label=com.docker.compose.project=$1 left
    left=$("$DOCKER" ps -aq --filter "$filter"; "$DOCKER" volume ls -q --filter "$filter";
        "$DOCKER" network ls -q --filter "$filter")
    [ -z "$left" ] || { DETAIL="left: $(tr '\n' ' ' <<<"$left")"; return 1; }
    DETAIL="no containers, volumes or networks of $1"
}
nothing_left_cpu() { nothing_left "$PROJECT"; }

# Without the CPU override the trainer reserves NVIDIA GPUs, which this machine lacks.
gpu_up_fails() {
    local output status
    output=$(compose -p "$GPU_PROJECT" "${COMPOSE_GPU[@]}" up -d --no-build --pull never trainer 2>&1)
    status=$?
    echo "$output"
    compose -p "$GPU_PROJECT" "${COMPOSE_GPU[@]}" down -v --timeout 10
    [ $status -ne 0 ] || { DETAIL="up succeeded"; return 1; }
    DETAIL=$(grep -m1 -o 'could not select device driver.*' <<<"$output") ||
        { DETAIL="failed, but not naming the nvidia driver"; return 1; }
    grep -q nvidia <<<"$DETAIL" || return 1
    local error=$DETAIL
    nothing_left "$GPU_PROJECT" || { DETAIL="$error; down -v $DETAIL"; return 1; }
    DETAIL="$error; down -v left nothing"
}

# --- teardown --------------------------------------------------------------------------------

stop_dockerd() {
    [ -n "$dockerd_pid" ] || return 0
    local project
    for project in "$PROJECT" "$GPU_PROJECT"; do
        if [ -n "$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$project" 2>/dev/null)" ]; then
            compose -p "$project" "${COMPOSE_CPU[@]}" down -v --timeout 10
        fi
    done
    # Containers kept in the data root would restart with the next run's daemon.
    "$DOCKER" ps -aq | xargs -r "$DOCKER" rm -f
    "$DOCKER" image prune -f  # earlier builds of $IMAGE
    kill -TERM "$dockerd_pid"
    local i
    for i in $(seq 30); do
        kill -0 "$dockerd_pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$dockerd_pid" 2>/dev/null; then
        kill -KILL "$dockerd_pid"
        DETAIL="killed pid $dockerd_pid after 30 s"
    else
        DETAIL="pid $dockerd_pid stopped"
    fi
    wait "$dockerd_pid" 2>/dev/null
    dockerd_pid=""
    if [ -n "$made_docker0" ]; then
        ip link delete docker0 2>/dev/null
    fi
    return 0
}

finish() {
    trap - EXIT INT TERM
    broken=""
    [ -n "$dockerd_pid" ] && run setup "stop dockerd" stop_dockerd
    # Steps still running in the background (after a failure) end with the daemon.
    local pid
    for pid in "${bg_pid[@]}"; do
        wait "$pid"
    done
    # The daemon's socket, exec root and pidfile go with it (nothing is left in
    # /tmp); its log stays beside the result. Not while anything is mounted there.
    if [ -z "$dockerd_pid" ] && ! grep -q " $RUN_DIR/" /proc/mounts; then
        [ -f "$RUN_DIR/dockerd.log" ] && cp "$RUN_DIR/dockerd.log" "$OUT_DIR/dockerd.log"
        rm -rf "$RUN_DIR"
    fi
    local total
    total=$(elapsed "$START" "$(date +%s.%N)")
    python3 .ci/containers_checks.py write-result "$CHECKS" "$RESULT" --seconds "$total" \
        --commit "$(git rev-parse HEAD 2>/dev/null)" --tf-base-cached "$tf_base_cached"
    local status=$?
    echo "containers: ${total}s in all; load average $(cut -d' ' -f1-3 /proc/loadavg); result in ${RESULT#"$REPO"/}"
    exit $status
}

# Only one run at a time: they would share the daemon's paths and the published ports.
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/lock"
if ! flock -n 9; then
    echo "containers: another .ci/containers.sh holds $CACHE_DIR/lock; not run" >&2
    exit 1
fi
mkdir -p "$OUT_DIR"
rm -f "$RESULT"
: >"$TRANSCRIPT"
: >"$CHECKS"
START=$(date +%s.%N)
trap finish EXIT
trap 'echo "interrupted"; exit 130' INT TERM

mkdir -p "$RUN_DIR"
echo "containers: project $PROJECT; load average $(cut -d' ' -f1-3 /proc/loadavg); transcript in ${TRANSCRIPT#"$REPO"/}"
await_compose() { await compose; }
await_prometheus() { await prometheus; }

# Three steps run beside others to save time when cold: fetching Compose v2 (with
# its own apt lists and cache), mmdebstrap (its own apt and dpkg in its own
# directory) and building the Prometheus image.
run setup "preflight" preflight && in_background compose install_compose
run setup "install mmdebstrap" install_mmdebstrap
# A new data root means a cold run: make the Debian root file system meanwhile.
[ -z "$broken" ] && [ ! -d "$DATA_ROOT" ] && in_background rootfs make_rootfs
run setup "install docker.io" install_docker
run setup "install Compose v2 (trixie's docker-compose)" await_compose
run setup "client venv (.venv/bin/ntrain)" client_venv
run setup "start dockerd" start_dockerd
run setup "debian image (mmdebstrap, docker import)" debian_image &&
    in_background prometheus prometheus_image
run setup "tensorflow stand-in base image" tf_base_image
run setup "prometheus image from Debian's package" await_prometheus
run setup "build deploy/Dockerfile on the stand-in" ntrain_image
run setup "secrets (deploy/make-certs.sh)" secrets
run check "compose files valid (docker compose config -q)" compose_config
run setup "compose up trainer prometheus (CPU override)" compose_up
run check "trainer healthy" trainer_healthy
run check "published ports on 127.0.0.1 only" ports_on_loopback
run check "trainer shm_size and ulimits for NCCL" nccl_settings
run check "prometheus scrapes the trainer (target up)" prometheus_target_up
run check "prometheus loaded the alert rules" alert_rules_loaded
run check "synthetic job through 127.0.0.1:50051" synthetic_job
run setup "compose down -v" compose_down
run check "down -v left nothing" nothing_left_cpu
run check "without the CPU override, up fails naming the nvidia driver" gpu_up_fails
