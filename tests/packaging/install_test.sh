#!/usr/bin/env bash
# Install test of the Cistern .debs on a clean Debian bookworm machine (CI runs it on its own
# machine), as root:
#
#   tests/packaging/install_test.sh DIST_DIR
#
# DIST_DIR holds one cistern-agent_*_ARCH.deb and one cistern-receiver_*_ARCH.deb for this
# machine's architecture (scripts/package.sh writes them to dist/). It checks, and says so:
#   a. `apt-get install ./…deb` resolves the dependencies from the Debian mirror; the shipped
#      /etc/cistern/{agent,receiver}.yaml are conffiles, pass --check-config and hold no
#      credentials; the system user `cistern` and /var/lib/cistern (owned by it) exist; the
#      units and man pages are installed.
#   b. With a throwaway CA (openssl) and the shipped configs edited as a technician would
#      (sed: agent id, receiver URL, ports; certificates at the paths the configs name), the
#      receiver and then the agent run EXACTLY as their units start them: ExecStartPre= and
#      ExecStart= parsed from /lib/systemd/system/cistern-*.service, StateDirectory= and
#      RuntimeDirectory= made as systemd makes them, run as the unit's User=/Group= with
#      setpriv (UMask=, NoNewPrivileges=, an empty CapabilityBoundingSet= applied too;
#      the namespace sandboxing, ProtectSystem= and the like, is not). Both run as
#      `cistern`; records fed to the agent's socket input (Unix socket and TCP) are answered
#      OK and reach the receiver's read API; `cistern-agent status` run as root leaves no
#      root-owned file in the state directory; ExecReload=, if the unit has one, keeps the
#      agent running.
#   c. An upgrade to a revision-2 build (CISTERN_DEB_REVISION=2 scripts/package.sh, built
#      from this checkout) keeps the edited conffiles byte for byte, without any
#      --force-conf* option and without a prompt, keeps the state, and the receiver started
#      again still serves what it stored.
#   d. `apt-get purge` removes the binaries, conffiles, units, man pages, docs and the units'
#      enablement links; what stays is what packaging/debian/*.postrm says stays.
# UPGRADE_DIST=DIR takes the newer .debs for c. from DIR instead of building them (a CI job
# that built them already).
# It cleans up on any exit (kills what it started, purges the packages, removes the test's
# certificates, /run/cistern, /var/lib/cistern, and the `cistern` user if the machine did
# not have one before). The temp dir (logs, PKI) is kept when the test fails (KEEP_TMP=0:
# never, KEEP_TMP=1: always).
#
# systemd need not run: the units are never started through systemctl unless PID 1 is
# systemd (then only `systemctl stop` of what the packages started, and
# `systemd-analyze verify`).
# Takes about 30 s on 2 cores with the build dependencies installed (a: 3 s, b: 5 s, c: 16 s
# of which 10 s build revision 2, d: 3 s); on a fresh machine add 1-3 min of apt downloads
# (the packages' dependencies; debhelper, cmake and the -dev packages for revision 2).
set -uo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
t_start=$(date +%s)
agent_id=install-test-gw
runid=$(date +%s)-$$

say() { printf '\n== %s\n' "$*"; }
ok() { printf '  ok: %s\n' "$*"; }
fail() {
    printf '\nFAIL: %s\n' "$*" >&2
    exit 1
}
# check DESCRIPTION COMMAND...: run it quietly; its output is shown only when it fails.
check() {
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then
        ok "$what"
    else
        printf '%s\n' "$out" | sed 's/^/    | /' >&2
        fail "$what  (command: $*)"
    fi
}
# checkv: the same, and it shows the command's output (short ones) when it passes too.
checkv() {
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then
        ok "$what"
        printf '%s\n' "$out" | head -12 | sed 's/^/      /'
    else
        printf '%s\n' "$out" | sed 's/^/    | /' >&2
        fail "$what  (command: $*)"
    fi
}
apt_get() {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q "$@" </dev/null
}
pkg_state() { # installed | config-files | not-installed
    local s
    s=$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) || s=not-installed
    echo "${s:-not-installed}"
}

[ $# -eq 1 ] || { echo "usage: $0 DIST_DIR" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "install_test: must run as root (it installs packages)" >&2; exit 2; }
dist=$(cd "$1" 2>/dev/null && pwd) || { echo "install_test: no directory $1" >&2; exit 2; }
arch=$(dpkg --print-architecture)

# ---------------------------------------------------------------------------------------
say "preflight"
shopt -s nullglob
agent_debs=("$dist"/cistern-agent_*_"$arch".deb)
recv_debs=("$dist"/cistern-receiver_*_"$arch".deb)
shopt -u nullglob
[ ${#agent_debs[@]} -eq 1 ] && [ ${#recv_debs[@]} -eq 1 ] ||
    fail "$dist must hold exactly one cistern-agent_*_$arch.deb and one cistern-receiver_*_$arch.deb (found: ${agent_debs[*]:-none} ${recv_debs[*]:-none})"
for p in cistern-agent cistern-receiver; do
    [ "$(pkg_state $p)" = not-installed ] ||
        fail "$p is already on this machine ($(pkg_state $p)); the test needs a clean one: apt-get purge cistern-agent cistern-receiver"
done
for d in /etc/cistern /var/lib/cistern /run/cistern; do
    [ ! -e "$d" ] || fail "$d exists already; the test needs a clean machine (remove it first)"
done
user_existed=0
getent passwd cistern >/dev/null && user_existed=1
pid1=$(cat /proc/1/comm 2>/dev/null || echo unknown)
have_systemd=0
[ "$pid1" = systemd ] && have_systemd=1
echo "  arch $arch; PID 1 is '$pid1'; user cistern exists before: $([ $user_existed = 1 ] && echo yes || echo no)"
echo "  agent:    ${agent_debs[0]}"
echo "  receiver: ${recv_debs[0]}"

tmp=$(mktemp -d /tmp/cistern-install-test.XXXXXX) || fail "mktemp"
chmod 755 "$tmp" # apt's _apt user reads the .debs from here
pids=()         # processes we started
etc_files=()    # files the test put into /etc/cistern (the technician's certificates)

stop_pid() { # stop_pid PID: SIGTERM, wait up to 30 s, SIGKILL; returns the exit status
    local pid=$1 i rc
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid" 2>/dev/null; echo "  (pid $pid killed after 30 s)" >&2; }
    wait "$pid" 2>/dev/null
    rc=$?
    local keep=() q
    for q in "${pids[@]}"; do [ "$q" = "$pid" ] || keep+=("$q"); done
    pids=("${keep[@]}")
    return $rc
}

cleanup() {
    local rc=$? p
    set +e
    trap - EXIT INT TERM
    say "cleanup"
    for p in "${pids[@]}"; do
        [ -n "$p" ] && kill -0 "$p" 2>/dev/null && { kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null; }
    done
    if [ "$(pkg_state cistern-agent)" != not-installed ] || [ "$(pkg_state cistern-receiver)" != not-installed ]; then
        [ $have_systemd = 1 ] && systemctl stop cistern-agent cistern-receiver 2>/dev/null
        apt_get purge -y cistern-agent cistern-receiver >"$tmp/cleanup-purge.log" 2>&1 ||
            dpkg --purge cistern-agent cistern-receiver >>"$tmp/cleanup-purge.log" 2>&1 ||
            echo "  could not purge the packages: see $tmp/cleanup-purge.log" >&2
    fi
    for p in "${etc_files[@]}"; do rm -f "$p"; done
    rmdir /etc/cistern 2>/dev/null
    rm -rf /run/cistern /var/lib/cistern
    if [ $user_existed = 0 ] && getent passwd cistern >/dev/null; then
        userdel cistern 2>/dev/null
        getent group cistern >/dev/null && groupdel cistern 2>/dev/null
    fi
    # kept on failure (for the logs) unless KEEP_TMP=0; KEEP_TMP=1 keeps it always
    if [ "${KEEP_TMP:-}" = 1 ] || { [ $rc -ne 0 ] && [ "${KEEP_TMP:-}" != 0 ]; }; then
        echo "  kept $tmp (logs, PKI)"
    else
        rm -rf "$tmp"
    fi
    printf '\n== install test %s after %ss\n' "$([ $rc -eq 0 ] && echo PASSED || echo FAILED)" \
        $(( $(date +%s) - t_start ))
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The test's own tools (a clean machine may lack them). They stay installed.
tools=()
command -v openssl >/dev/null || tools+=(openssl)
command -v curl >/dev/null || tools+=(curl)
command -v python3 >/dev/null || tools+=(python3)
command -v man >/dev/null || tools+=(man-db)
command -v setpriv >/dev/null || tools+=(util-linux)
say "apt-get update"
apt_get update >"$tmp/apt-update.log" 2>&1 || { tail -5 "$tmp/apt-update.log" | sed 's/^/    | /'; echo "  warning: apt-get update failed; going on with the lists there are"; }
if [ ${#tools[@]} -gt 0 ]; then
    check "installed the test's tools: ${tools[*]}" apt_get install -y --no-install-recommends "${tools[@]}"
fi
if grep -rqsE '^\s*path-exclude.*/usr/share/man' /etc/dpkg/dpkg.cfg.d/; then
    fail "dpkg here excludes /usr/share/man (/etc/dpkg/dpkg.cfg.d: a -slim image?): man pages cannot be checked"
fi

# Small helpers in Python (standard library only): free ports, the socket-input client, the
# receiver's read API.
cat >"$tmp/helper.py" <<'EOF'
import json, socket, sys, time, urllib.request

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p

def feed(sock, payloads, timeout=60):
    """Send the lines, return the answers (one per line, in order)."""
    sock.settimeout(timeout)
    sock.sendall(b"".join(p.encode() + b"\n" for p in payloads))
    buf, answers = b"", []
    while len(answers) < len(payloads):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        answers += [l.decode() for l in lines]
    sock.close()
    return answers

def cmd_feed(unix_path, tcp_port, prefix, n_unix, n_tcp):
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.connect(unix_path)
    sent = ["%s-unix-%d" % (prefix, i) for i in range(int(n_unix))]
    answers = feed(u, sent)
    if int(n_tcp):
        more = ["%s-tcp-%d" % (prefix, i) for i in range(int(n_tcp))]
        answers += feed(socket.create_connection(("127.0.0.1", int(tcp_port)), timeout=10), more)
        sent += more
    bad = [(p, a) for p, a in zip(sent, answers) if not a.startswith("OK ")]
    if len(answers) != len(sent) or bad:
        sys.exit("%d lines sent, %d answers, not OK: %r" % (len(sent), len(answers), bad[:3]))
    print("%d lines answered OK (seqs %s..%s)" % (len(sent), answers[0][3:], answers[-1][3:]))

def records(api, agent_id):
    out, after = [], 0
    while True:
        url = "%s/v1/agents/%s/records?after=%d&limit=1000" % (api, agent_id, after)
        with urllib.request.urlopen(url, timeout=10) as r:
            page = json.loads(r.read().decode())
        if not page["records"]:
            return out
        out += page["records"]
        after = int(page["next_after"])

def cmd_wait_records(api, agent_id, prefix, n, timeout):
    """Wait until the receiver serves N records whose payload starts with PREFIX, each once."""
    deadline = time.monotonic() + float(timeout)
    got, err = {}, None
    while time.monotonic() < deadline:
        try:
            recs = records(api, agent_id)
            got = {}
            for r in recs:
                if r["payload"].startswith(prefix + "-"):
                    got[r["payload"]] = got.get(r["payload"], 0) + 1
            dups = {p: c for p, c in got.items() if c > 1}
            if dups:
                sys.exit("stored more than once: %r" % list(dups.items())[:3])
            if len(got) >= int(n):
                streams = sorted({r["stream"] for r in recs})
                print("%d records with prefix %s stored once each (%d records in all, streams %s)"
                      % (len(got), prefix, len(recs), ",".join(streams)))
                return
        except (OSError, ValueError, KeyError) as e:
            err = e
        time.sleep(0.5)
    sys.exit("after %ss the receiver serves %d of %d records with prefix %s%s"
             % (timeout, len(got), int(n), prefix, " (last error %r)" % err if err else ""))

def cmd_wait_connect(unix_path, timeout):
    deadline = time.monotonic() + float(timeout)
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(unix_path)
            s.close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                sys.exit("nothing accepts on %s after %ss: %s" % (unix_path, timeout, e))
            time.sleep(0.2)

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "free_port":
        print(free_port())
    else:
        globals()["cmd_" + cmd](*args)
EOF
helper() { python3 "$tmp/helper.py" "$@"; }

# ---------------------------------------------------------------------------------------
unit_file() {
    local f
    for f in /lib/systemd/system/cistern-$1.service /usr/lib/systemd/system/cistern-$1.service; do
        [ -f "$f" ] && { echo "$f"; return 0; }
    done
    return 1
}
# unit_get FILE KEY: the values of KEY= in the [Service] section, one per line, in order
# (continuation lines joined).
unit_get() {
    awk -v key="$2" '
        { line = $0 }
        cont != "" { line = cont line; cont = "" }
        /\\$/ { cont = substr(line, 1, length(line) - 1) " "; next }
        line ~ /^[ \t]*\[/ { sect = line; gsub(/[ \t]/, "", sect); next }
        sect != "[Service]" || line ~ /^[ \t]*[#;]/ { next }
        {
            i = index(line, "="); if (!i) next
            k = substr(line, 1, i - 1); v = substr(line, i + 1)
            gsub(/^[ \t]+|[ \t]+$/, "", k); gsub(/^[ \t]+|[ \t]+$/, "", v)
            if (k == key) print v
        }' "$1"
}

# run_unit NAME: start cistern-NAME as its unit does (see the header); sets UNIT_PID and
# UNIT_RELOAD (the ExecReload= command line, $MAINPID substituted, or empty).
run_unit() {
    local name=$1 unit user group uid gid home shell d mode line cmd ignore pfx i umask_
    local -a env sp argv
    unit=$(unit_file "$name") || fail "no unit file for cistern-$name"
    user=$(unit_get "$unit" User | tail -1)
    group=$(unit_get "$unit" Group | tail -1)
    [ -n "$user" ] || fail "$unit has no User=: it would run as root"
    [ -n "$group" ] || group=$(id -gn "$user")
    uid=$(id -u "$user" 2>/dev/null) && gid=$(getent group "$group" | cut -d: -f3) && [ -n "$gid" ] ||
        fail "$unit: user $user / group $group do not exist"
    home=$(getent passwd "$user" | cut -d: -f6)
    shell=$(getent passwd "$user" | cut -d: -f7)
    # systemd's environment for a system service with User= (no LANG: no locale.conf here)
    env=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
         HOME="$home" USER="$user" LOGNAME="$user" SHELL="$shell")
    # StateDirectory=/RuntimeDirectory=: /var/lib/X, /run/X, created (mode *DirectoryMode=,
    # default 0755) and owned by User=/Group= (systemd chowns an existing one too);
    # ConfigurationDirectory=: /etc/X, created if missing, owned by root.
    for d in $(unit_get "$unit" StateDirectory); do
        mode=$(unit_get "$unit" StateDirectoryMode | tail -1)
        install -d -m "${mode:-0755}" -o "$uid" -g "$gid" "/var/lib/$d" && chown "$uid:$gid" "/var/lib/$d" &&
            chmod "${mode:-0755}" "/var/lib/$d" || fail "StateDirectory /var/lib/$d"
        env+=(STATE_DIRECTORY="/var/lib/$d")
    done
    for d in $(unit_get "$unit" RuntimeDirectory); do
        mode=$(unit_get "$unit" RuntimeDirectoryMode | tail -1)
        install -d -m "${mode:-0755}" -o "$uid" -g "$gid" "/run/$d" && chown "$uid:$gid" "/run/$d" &&
            chmod "${mode:-0755}" "/run/$d" || fail "RuntimeDirectory /run/$d"
        env+=(RUNTIME_DIRECTORY="/run/$d")
    done
    for d in $(unit_get "$unit" ConfigurationDirectory); do
        [ -d "/etc/$d" ] || install -d -m 0755 "/etc/$d"
        env+=(CONFIGURATION_DIRECTORY="/etc/$d")
    done
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        case "$line" in *'"'*|*"'"*|*'$'*|*'%'*|*'\'*)
            fail "$unit: Environment=$line uses quoting/specifiers this test does not emulate" ;;
        esac
        for i in $line; do env+=("$i"); done
    done < <(unit_get "$unit" Environment)
    [ -z "$(unit_get "$unit" EnvironmentFile)" ] || fail "$unit: EnvironmentFile= is not emulated by this test"
    # User=, Group=, supplementary groups of the user; NoNewPrivileges=; an empty
    # CapabilityBoundingSet= drops every capability from the bounding set.
    sp=(setpriv --reuid="$uid" --regid="$gid" --init-groups)
    case "$(unit_get "$unit" NoNewPrivileges | tail -1)" in yes|true|on|1) sp+=(--no-new-privs) ;; esac
    if unit_get "$unit" CapabilityBoundingSet | grep -qx ''; then
        [ -z "$(unit_get "$unit" CapabilityBoundingSet | tail -1)" ] && sp+=(--bounding-set=-all --inh-caps=-all)
    fi
    umask_=$(unit_get "$unit" UMask | tail -1)
    umask_=${umask_:-0022}
    UNIT_NNP=$(printf '%s\n' "${sp[@]}" | grep -c -- --no-new-privs)
    UNIT_NOCAPS=$(printf '%s\n' "${sp[@]}" | grep -c -- --bounding-set=-all)
    UNIT_UID=$uid UNIT_GID=$gid

    # parse_exec LINE: argv=(...), ignore=1 for a '-' prefix, pfx=1 for '+' (full privileges)
    parse_exec() {
        local l=$1
        ignore=0 pfx=0
        while :; do
            case "$l" in
                -*) ignore=1; l=${l#-} ;;
                +*) pfx=1; l=${l#+} ;;
                [@:!]*) fail "$unit: Exec prefix '${l:0:1}' in '$1' is not emulated by this test" ;;
                *) break ;;
            esac
        done
        case "$l" in *'"'*|*"'"*|*'%'*|*'\'*|*';'*)
            fail "$unit: '$1' uses quoting/specifiers this test does not emulate" ;;
        esac
        read -ra argv <<<"$l"
        case "${argv[0]}" in /*) ;; *) fail "$unit: '$1': not an absolute path" ;; esac
    }
    # ExecStartPre=: each must succeed (unless '-'), as the unit's user.
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        parse_exec "$line"
        if [ $pfx = 1 ]; then
            cmd=(env -i "${env[@]}" "${argv[@]}")
        else
            cmd=(env -i "${env[@]}" "${sp[@]}" -- "${argv[@]}")
        fi
        echo "  ExecStartPre: ${argv[*]}  (as $([ $pfx = 1 ] && echo root || echo "$user:$group"))"
        if ! (cd / && umask "$umask_" && exec "${cmd[@]}") </dev/null >>"$tmp/$name.log" 2>&1; then
            [ $ignore = 1 ] || { tail -20 "$tmp/$name.log" | sed 's/^/    | /'; fail "cistern-$name: ExecStartPre=${line} failed"; }
        fi
    done < <(unit_get "$unit" ExecStartPre)
    # ExecStart= (Type=simple: one command, the main process)
    line=$(unit_get "$unit" ExecStart | grep -v '^$' | tail -1)
    [ -n "$line" ] || fail "$unit has no ExecStart="
    [ "$(unit_get "$unit" ExecStart | grep -vc '^$')" -eq 1 ] || fail "$unit: more than one ExecStart="
    parse_exec "$line"
    [ $pfx = 0 ] || fail "$unit: ExecStart=+ runs the service as root"
    echo "  ExecStart:    ${argv[*]}  (as $user:$group, umask $umask_, ${sp[*]:1})"
    (cd / && umask "$umask_" && exec env -i "${env[@]}" "${sp[@]}" -- "${argv[@]}") </dev/null >>"$tmp/$name.log" 2>&1 &
    UNIT_PID=$!
    pids+=("$UNIT_PID")
    UNIT_EXE=${argv[0]}
    UNIT_RELOAD=$(unit_get "$unit" ExecReload | grep -v '^$' | tail -1)
    UNIT_RELOAD=${UNIT_RELOAD//\$MAINPID/$UNIT_PID}
    UNIT_RELOAD=${UNIT_RELOAD//\$\{MAINPID\}/$UNIT_PID}
    UNIT_USER=$user
}

# check_creds NAME PID: the process runs the unit's binary as the unit's user, group,
# no_new_privs and bounding set.
check_creds() {
    local name=$1 pid=$2 i st rc
    for i in $(seq 50); do
        [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$UNIT_EXE" ] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" != "$UNIT_EXE" ] ||
        ! st=$(cat "/proc/$pid/status" 2>/dev/null); then
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null
            rc=$?
            tail -30 "$tmp/$name.log" | sed 's/^/    | /'
            fail "cistern-$name exited at start (status $rc)"
        fi
        fail "pid $pid is not $UNIT_EXE after 5 s"
    fi
    grep -qP "^Uid:\t$UNIT_UID\t$UNIT_UID\t$UNIT_UID\t$UNIT_UID$" <<<"$st" ||
        fail "cistern-$name (pid $pid) does not run as uid $UNIT_UID: $(grep ^Uid: <<<"$st")"
    grep -qP "^Gid:\t$UNIT_GID\t$UNIT_GID\t$UNIT_GID\t$UNIT_GID$" <<<"$st" ||
        fail "cistern-$name (pid $pid) does not run as gid $UNIT_GID: $(grep ^Gid: <<<"$st")"
    grep -q '^CapEff:\s*0*$' <<<"$st" || fail "cistern-$name has effective capabilities: $(grep ^CapEff: <<<"$st")"
    if [ "$UNIT_NNP" = 1 ]; then grep -q '^NoNewPrivs:\s*1$' <<<"$st" || fail "cistern-$name: NoNewPrivs not set"; fi
    if [ "$UNIT_NOCAPS" = 1 ]; then grep -q '^CapBnd:\s*0*$' <<<"$st" || fail "cistern-$name: bounding set not empty"; fi
    ok "cistern-$name pid $pid runs $UNIT_EXE as $UNIT_USER (uid $UNIT_UID gid $UNIT_GID$([ "$UNIT_NNP" = 1 ] && echo ", no_new_privs")$([ "$UNIT_NOCAPS" = 1 ] && echo ", empty bounding set"))"
}

wait_healthz() { # wait_healthz PID API
    local i
    for i in $(seq 600); do
        kill -0 "$1" 2>/dev/null || { tail -30 "$tmp/receiver.log" | sed 's/^/    | /'; fail "cistern-receiver exited"; }
        curl -sf "$2/healthz" 2>/dev/null | grep -q '"status": *"ok"' && { ok "receiver answers $2/healthz"; return 0; }
        sleep 0.1
    done
    tail -30 "$tmp/receiver.log" | sed 's/^/    | /'
    fail "receiver: no healthy /healthz on $2 after 60 s"
}

# edit_conf FILE ERE NEWLINE: replace the one line matching ERE by NEWLINE, in place (the
# file keeps its inode, owner and mode, as with an editor). Fails unless exactly one matches.
edit_conf() {
    local n
    n=$(grep -cE "$2" "$1")
    [ "$n" -eq 1 ] || fail "editing $1 as a technician would: expected one line matching /$2/, found $n (did the shipped file change? update this test)"
    # (through the environment: awk -v would interpret the backslashes)
    RE="$2" REP="$3" awk '$0 ~ ENVIRON["RE"] { print ENVIRON["REP"]; next } { print }' "$1" >"$tmp/edit" &&
        cat "$tmp/edit" >"$1" || fail "editing $1"
    echo "  edited $1: $3"
}

# ---------------------------------------------------------------------------------------
t=$(date +%s)
say "a. install"
cp "${agent_debs[0]}" "${recv_debs[0]}" "$tmp/" && chmod 644 "$tmp"/*.deb
check "apt-get install ./$(basename "${agent_debs[0]}") ./$(basename "${recv_debs[0]}")" \
    apt_get install -y "$tmp/$(basename "${agent_debs[0]}")" "$tmp/$(basename "${recv_debs[0]}")"
v1=$(dpkg-query -W -f='${Version}' cistern-agent)
[ "$(dpkg-query -W -f='${Version}' cistern-receiver)" = "$v1" ] || fail "the two packages have different versions"
ok "installed version $v1: $(dpkg-query -W -f='${Depends}' cistern-agent)"
if [ $have_systemd = 1 ]; then
    # the packages may have started the services: this test runs them itself
    systemctl stop cistern-agent cistern-receiver
    for u in agent receiver; do
        check "systemd-analyze verify cistern-$u.service" systemd-analyze verify "$(unit_file $u)"
    done
fi
for b in agent receiver; do
    check "/usr/bin/cistern-$b is installed and runs" /usr/bin/cistern-$b --version
    check "/etc/cistern/$b.yaml is a conffile of cistern-$b" \
        grep -qE "^ /etc/cistern/$b.yaml [0-9a-f]{32}" <(dpkg-query -W -f='${Conffiles}\n' cistern-$b)
    check "shipped /etc/cistern/$b.yaml passes cistern-$b --check-config" \
        /usr/bin/cistern-$b --check-config /etc/cistern/$b.yaml
    check "shipped /etc/cistern/$b.yaml sets no credentials (token/password)" \
        bash -c "! grep -nE '^[^#]*\b(token|password|secret)\s*:\s*\S' /etc/cistern/$b.yaml"
    echo "  /etc/cistern/$b.yaml: $(stat -c '%A %U:%G' /etc/cistern/$b.yaml)"
    check "unit cistern-$b.service is installed" unit_file $b
done
check "user cistern exists, a system user" \
    bash -c '[ "$(id -u cistern)" -lt 1000 ] && getent group cistern >/dev/null'
echo "  $(getent passwd cistern)"
check "/var/lib/cistern exists, owned by cistern:cistern" \
    bash -c '[ -d /var/lib/cistern ] && [ "$(stat -c %U:%G /var/lib/cistern)" = cistern:cistern ]'
check "/var/lib/cistern is not writable by others" bash -c '[ $(( 0$(stat -c %a /var/lib/cistern) & 02 )) -eq 0 ]'
for m in "8 cistern-agent" "8 cistern-receiver" "5 cistern-agent.yaml" "5 cistern-receiver.yaml"; do
    check "man page $m: $(man -w $m 2>/dev/null)" man -w $m
done
ok "step a took $(( $(date +%s) - t ))s"

# ---------------------------------------------------------------------------------------
t=$(date +%s)
say "b. configure, start as the units do, forward records"
mkdir -p "$tmp/orig" "$tmp/pki"
cp -p /etc/cistern/agent.yaml /etc/cistern/receiver.yaml "$tmp/orig/"
# A throwaway CA as in tests/integration/cistern_harness.py: the receiver's certificate is
# for localhost / 127.0.0.1; the gateway's client certificate has CN = agent.id.
cat >"$tmp/pki/ext.cnf" <<'EOF'
[req]
distinguished_name=dn
[dn]
[v3_ca]
basicConstraints=critical,CA:TRUE
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
[server]
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
[client]
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
make_pki() {
    cd "$tmp/pki" &&
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key &&
    openssl req -x509 -new -key ca.key -subj /CN=cistern-install-test-ca -days 3 \
        -config ext.cnf -extensions v3_ca -out ca.pem &&
    for leaf in "server localhost server" "device $agent_id client"; do
        set -- $leaf
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" &&
        openssl req -new -key "$1.key" -subj "/CN=$2" -config ext.cnf -out "$1.csr" &&
        openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 3 \
            -sha256 -extfile ext.cnf -extensions "$3" -out "$1.pem" || return 1
    done
}
check "made a throwaway CA, server cert (127.0.0.1) and device cert (CN=$agent_id)" make_pki
# The technician puts them where the shipped configs look: keys 0600, owned by cistern.
put() { # put SRC DEST MODE [OWNER]
    install -m "$3" -o "${4:-root}" -g "${4:-root}" "$tmp/pki/$1" "/etc/cistern/$2" || fail "install /etc/cistern/$2"
    etc_files+=("/etc/cistern/$2")
}
put ca.pem ca.pem 0644
put ca.pem devices-ca.pem 0644
put server.pem server.pem 0644
put server.key server.key 0600 cistern
put device.pem device.pem 0644
put device.key device.key 0600 cistern
ok "certificates in /etc/cistern: $(cd /etc/cistern && echo *.pem *.key)"

rport=$(helper free_port) && aport=$(helper free_port) && tport=$(helper free_port) || fail "free ports"
while [ "$aport" = "$rport" ] || [ "$tport" = "$rport" ] || [ "$tport" = "$aport" ]; do
    aport=$(helper free_port); tport=$(helper free_port)
done
api=http://127.0.0.1:$aport
edit_conf /etc/cistern/receiver.yaml '^  http: ' "  http: 127.0.0.1:$rport"
edit_conf /etc/cistern/receiver.yaml '^ *#? *api: ' "  api: 127.0.0.1:$aport"
edit_conf /etc/cistern/agent.yaml '^  id: ' "  id: $agent_id"
edit_conf /etc/cistern/agent.yaml '^  url: https://' "  url: https://127.0.0.1:$rport/v1/batches"
edit_conf /etc/cistern/agent.yaml '^ +listen: 127\.0\.0\.1:[0-9]+' "    listen: 127.0.0.1:$tport"
sock=$(sed -nE 's/^ +path: (\/run\/[^ #]+\.sock).*/\1/p' /etc/cistern/agent.yaml | head -1)
[ -n "$sock" ] || fail "the shipped agent.yaml has no socket input under /run (inputs: path:)"

run_unit receiver
recv_pid=$UNIT_PID
check_creds receiver "$recv_pid"
wait_healthz "$recv_pid" "$api"
# As an operator would: as root, with the certificate. The store belongs to cistern; the
# command switches to its owner, so no file of the store ends up owned by root.
checkv "cistern-receiver device add $agent_id --key /etc/cistern/device.pem (as root)" \
    /usr/bin/cistern-receiver --config /etc/cistern/receiver.yaml device add "$agent_id" \
    --key /etc/cistern/device.pem
check "the store's files still belong to cistern after device add" \
    bash -c '! find /var/lib/cistern -name "store.db*" ! -user cistern | grep .'
run_unit agent
agent_pid=$UNIT_PID
agent_reload=$UNIT_RELOAD
check_creds agent "$agent_pid"
check "agent accepts on its socket input $sock" helper wait_connect "$sock" 60
check "$sock is a socket owned by cistern, mode 0660" \
    bash -c "[ -S $sock ] && [ \"\$(stat -c '%U %a' $sock)\" = 'cistern 660' ]"

checkv "records fed to the agent (unix socket and TCP) are answered OK" \
    helper feed "$sock" "$tport" "it-$runid-a" 150 50
checkv "those 200 records reach the receiver, once each (read API $api)" \
    helper wait_records "$api" "$agent_id" "it-$runid-a" 200 90
checkv "cistern-agent status (run as root, as a technician would)" \
    /usr/bin/cistern-agent status --config /etc/cistern/agent.yaml
check "every file under /var/lib/cistern and /run/cistern belongs to cistern" \
    bash -c '! find /var/lib/cistern /run/cistern ! -user cistern | grep .'
ls -l /var/lib/cistern | sed 's/^/    /'
if [ -n "$agent_reload" ]; then
    echo "  ExecReload: $agent_reload"
    check "agent ExecReload= ($agent_reload)" bash -c "$agent_reload"
    sleep 2
    kill -0 "$agent_pid" 2>/dev/null || { tail -20 "$tmp/agent.log" | sed 's/^/    | /'; fail "the agent died on ExecReload="; }
    check "after ExecReload= the agent still forwards" helper feed "$sock" "$tport" "it-$runid-r" 10 0
    check "... and the receiver stores it" helper wait_records "$api" "$agent_id" "it-$runid-r" 10 60
fi
stop_pid "$agent_pid"; rc=$?
[ $rc -eq 0 ] || { tail -20 "$tmp/agent.log" | sed 's/^/    | /'; fail "agent exited $rc on SIGTERM"; }
ok "agent stopped on SIGTERM, exit 0"
stop_pid "$recv_pid"; rc=$?
[ $rc -eq 0 ] || { tail -20 "$tmp/receiver.log" | sed 's/^/    | /'; fail "receiver exited $rc on SIGTERM"; }
ok "receiver stopped on SIGTERM, exit 0"
ok "step b took $(( $(date +%s) - t ))s"

# ---------------------------------------------------------------------------------------
t=$(date +%s)
say "c. upgrade keeps the edited conffiles"
printf '# %s: edited by the technician (install test %s)\n' "$(date -u +%F)" "$runid" >>/etc/cistern/agent.yaml
check "edited agent.yaml still passes --check-config" /usr/bin/cistern-agent --check-config /etc/cistern/agent.yaml
sum_before=$(sha256sum /etc/cistern/agent.yaml /etc/cistern/receiver.yaml)
uid_before=$(id -u cistern)
mkdir -p "$tmp/v2"
if [ -n "${UPGRADE_DIST:-}" ]; then
    echo "  revision 2 from UPGRADE_DIST=$UPGRADE_DIST"
    cp "$UPGRADE_DIST"/cistern-agent_*_"$arch".deb "$UPGRADE_DIST"/cistern-receiver_*_"$arch".deb "$tmp/v2/" ||
        fail "no .debs in UPGRADE_DIST=$UPGRADE_DIST"
else
    echo "  building revision 2: CISTERN_DEB_REVISION=2 DEB_BUILD_OPTIONS=nocheck scripts/package.sh --no-lintian --dist $tmp/v2"
    # nocheck: the unit tests are not what this test is about (and need cmocka)
    if ! (cd "$repo" && CISTERN_DEB_REVISION=2 DEB_BUILD_OPTIONS=nocheck \
            scripts/package.sh --no-lintian --dist "$tmp/v2") >"$tmp/package-v2.log" 2>&1; then
        tail -30 "$tmp/package-v2.log" | sed 's/^/    | /'
        fail "building the revision-2 packages failed (log: $tmp/package-v2.log)"
    fi
fi
chmod 644 "$tmp"/v2/*.deb 2>/dev/null
shopt -s nullglob
v2_debs=("$tmp"/v2/cistern-agent_*_"$arch".deb "$tmp"/v2/cistern-receiver_*_"$arch".deb)
shopt -u nullglob
[ ${#v2_debs[@]} -eq 2 ] || fail "scripts/package.sh --dist $tmp/v2 did not write the two .debs (found: ${v2_debs[*]:-none})"
v2=$(dpkg-deb -f "${v2_debs[0]}" Version)
dpkg --compare-versions "$v2" gt "$v1" || fail "the rebuilt version $v2 is not newer than $v1"
ok "built version $v2 ($(( $(date +%s) - t ))s)"
for deb in "${v2_debs[@]}"; do
    # the scenario is "the shipped conffile did not change": then dpkg must keep the edit
    b=$(dpkg-deb -f "$deb" Package)
    b=${b#cistern-}
    cmp -s <(dpkg-deb --fsys-tarfile "$deb" | tar -xO ./etc/cistern/$b.yaml) "$tmp/orig/$b.yaml" ||
        fail "revision 2 ships a different /etc/cistern/$b.yaml than revision 1"
done
ok "revision 2 ships the same agent.yaml and receiver.yaml as revision 1"
# no --force-conf*; stdin is /dev/null, so a conffile prompt would fail the install
if ! apt_get install -y "${v2_debs[@]}" >"$tmp/apt-install-v2.log" 2>&1; then
    tail -30 "$tmp/apt-install-v2.log" | sed 's/^/    | /'
    fail "apt-get install of $v2 failed"
fi
ok "apt-get install ./cistern-{agent,receiver}_${v2}_$arch.deb: upgraded without prompting"
grep -i "configuration file" "$tmp/apt-install-v2.log" && fail "dpkg talked about a configuration file"
for p in cistern-agent cistern-receiver; do
    check "$p is now $v2" bash -c "[ \"\$(dpkg-query -W -f='\${Version}' $p)\" = '$v2' ]"
done
check "the edited /etc/cistern/agent.yaml and receiver.yaml are unchanged, byte for byte" \
    bash -c "[ \"\$(sha256sum /etc/cistern/agent.yaml /etc/cistern/receiver.yaml)\" = '$sum_before' ]"
check "the technician's comment survived" grep -q "edited by the technician (install test $runid)" /etc/cistern/agent.yaml
check "no .dpkg-dist/.dpkg-new/.dpkg-old files in /etc/cistern" \
    bash -c '! ls -a /etc/cistern | grep -E "\.dpkg-|\.ucf-"'
check "user cistern kept its uid ($uid_before)" bash -c "[ \"\$(id -u cistern)\" = '$uid_before' ]"
check "state kept: /var/lib/cistern/spool.db and store.db, owned by cistern" \
    bash -c '[ "$(stat -c %U /var/lib/cistern/spool.db /var/lib/cistern/store.db | sort -u)" = cistern ]'
run_unit receiver
recv_pid=$UNIT_PID
check_creds receiver "$recv_pid"
wait_healthz "$recv_pid" "$api"
checkv "the upgraded receiver still serves the 200 records stored before" \
    helper wait_records "$api" "$agent_id" "it-$runid-a" 200 30
run_unit agent
agent_pid=$UNIT_PID
check_creds agent "$agent_pid"
check "upgraded agent accepts on $sock" helper wait_connect "$sock" 60
checkv "records fed to the upgraded agent are answered OK" helper feed "$sock" "$tport" "it-$runid-c" 20 0
checkv "... and reach the receiver" helper wait_records "$api" "$agent_id" "it-$runid-c" 20 90
stop_pid "$agent_pid" || fail "agent exited non-zero on SIGTERM"
stop_pid "$recv_pid" || fail "receiver exited non-zero on SIGTERM"
ok "step c took $(( $(date +%s) - t ))s"

# ---------------------------------------------------------------------------------------
t=$(date +%s)
say "d. purge"
dpkg -L cistern-agent cistern-receiver | sort -u >"$tmp/files.list"
check "apt-get purge -y cistern-agent cistern-receiver" apt_get purge -y cistern-agent cistern-receiver
for p in cistern-agent cistern-receiver; do
    check "$p is gone from dpkg's database" bash -c "[ \"\$(dpkg-query -W -f='\${db:Status-Status}' $p 2>/dev/null || echo not-installed)\" = not-installed ]"
done
left=$(while read -r f; do [ -e "$f" ] && [ ! -d "$f" ] && echo "$f"; done <"$tmp/files.list")
[ -z "$left" ] || fail "files of the packages still there after purge: $left"
ok "none of the $(grep -c . "$tmp/files.list") paths the packages listed is left as a file"
for f in /usr/bin/cistern-agent /usr/bin/cistern-receiver /etc/cistern/agent.yaml /etc/cistern/receiver.yaml \
    /lib/systemd/system/cistern-agent.service /lib/systemd/system/cistern-receiver.service \
    /usr/lib/systemd/system/cistern-agent.service /usr/lib/systemd/system/cistern-receiver.service \
    /usr/share/doc/cistern-agent /usr/share/doc/cistern-receiver; do
    [ ! -e "$f" ] || fail "$f is still there after purge"
done
ok "binaries, conffiles, units and docs are gone"
for m in "8 cistern-agent" "8 cistern-receiver" "5 cistern-agent.yaml" "5 cistern-receiver.yaml"; do
    man -w $m >/dev/null 2>&1 && fail "man page $m is still there: $(man -w $m)"
done
ok "man pages are gone"
links=$(find /etc/systemd/system /var/lib/systemd/deb-systemd-helper-enabled \
    /var/lib/systemd/deb-systemd-helper-masked -name 'cistern-*' 2>/dev/null)
[ -z "$links" ] || fail "systemd enablement left behind: $links"
ok "no cistern-* enablement links or deb-systemd-helper state left"
# What the technician put in /etc/cistern (the certificates) is theirs and stays; no
# package file does.
extra=$(find /etc/cistern -mindepth 1 2>/dev/null | grep -vxF -f <(printf '%s\n' "${etc_files[@]}"))
[ -z "$extra" ] || fail "left in /etc/cistern after purge: $extra"
ok "/etc/cistern holds only the technician's certificates ($(ls /etc/cistern 2>/dev/null | wc -l) files)"
# packaging/debian/cistern-*.postrm: purge removes /var/lib/cistern (spool, store) and keeps
# the system user (Debian practice: its uid may own files elsewhere).
check "/var/lib/cistern (spool and store) removed on purge" bash -c '[ ! -e /var/lib/cistern ]'
if getent passwd cistern >/dev/null; then
    ok "user cistern kept (Debian practice)"
else
    ok "user cistern removed"
fi
ok "step d took $(( $(date +%s) - t ))s"
