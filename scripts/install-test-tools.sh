#!/usr/bin/env bash
# Install the programs some tests drive, when they are missing and apt-get can be used:
# prometheus and promtool (scrape the exporter, check the alerting rules; Debian's prometheus
# package ships both), chromium + chromium-driver (loads Flower's dashboard), docker-compose
# (validates docker-compose.yml). kubectl is not a Debian package: see
# https://kubernetes.io/docs/tasks/tools/ (its tests fail in CI without it). Outside CI a program that could not be
# installed only makes its tests skip; in CI (CI=true) this script then fails, naming it.
set -u
in_ci() { case "${CI:-}" in 1|true|TRUE|True|yes) return 0 ;; *) return 1 ;; esac; }
missing() {
    local name out=()
    for name in prometheus promtool chromium chromedriver docker-compose; do
        command -v "$name" >/dev/null 2>&1 || out+=("$name")
    done
    echo "${out[*]}"
}
package() {
    case "$1" in chromedriver) echo chromium-driver ;; promtool) echo prometheus ;; *) echo "$1" ;; esac
}
packages_of() {  # the distinct packages that install these programs
    local name out=()
    for name in $1; do
        case " ${out[*]} " in *" $(package "$name") "*) ;; *) out+=("$(package "$name")") ;; esac
    done
    echo "${out[*]}"
}
give_up() {
    local packages
    read -r -a packages <<< "$(packages_of "$1")"
    if in_ci; then
        echo "install-test-tools: CI=true and $1 missing: install them ('apt-get install" \
             "${packages[*]}' as root, which 'make test' does when it can)" >&2
        exit 1
    fi
    echo "install-test-tools: $1 missing; the tests that use them will skip" \
         "(install: apt-get install ${packages[*]})"
    exit 0
}

need="$(missing)"
if [ -z "$need" ]; then
    echo "install-test-tools: prometheus, promtool, chromium, chromedriver, docker-compose present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-tools: not installing $need (needs apt-get as root)"
    give_up "$need"
fi
read -r -a packages <<< "$(packages_of "$need")"
echo "install-test-tools: installing ${packages[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${packages[@]}"; } \
        >"$log" 2>&1; then
    tail -n 5 "$log"
fi
rm -f "$log"
need="$(missing)"
[ -z "$need" ] || give_up "$need"
echo "install-test-tools: installed ${packages[*]}"
