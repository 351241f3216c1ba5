#!/usr/bin/env bash
# Install the programs some tests drive, when they are missing and apt-get can be used:
# prometheus and promtool (scrape the exporter, check the rules), chromium + chromium-driver
# (loads Flower's dashboard), docker-compose (validates docker-compose.yml). Never fails: a
# test whose program is absent skips and says so, except that the promtool and kubectl tests
# fail when CI is set (kubectl is not an apt package here: https://kubernetes.io/docs/tasks/tools/).
set -u
need=()
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    need+=(prometheus)              # Debian's package ships promtool too
fi
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
if [ ${#need[@]} -eq 0 ]; then
    echo "test tools present: prometheus, promtool, chromium, chromedriver, docker-compose"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "not installing ${need[*]} (needs apt-get as root); the tests that use them will skip"
    exit 0
fi
echo "installing ${need[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } \
        >"$log" 2>&1; then
    tail -n 5 "$log"
    echo "apt-get could not install ${need[*]}; the tests that use them will skip"
fi
rm -f "$log"
exit 0
