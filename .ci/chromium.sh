# Sourced by .ci/with-services.sh (`make test`): Debian's Chromium for the browser test.
#   ensure_chromium   installs Chromium from Debian's packages when absent and exports its
#                     path as MONORAY_TEST_CHROMIUM (tests/test_ui_browser.py drives it with
#                     Playwright; no browser is downloaded).
# By hand: `source .ci/chromium.sh && ensure_chromium`.

chromium_bin() {
  command -v chromium || command -v chromium-browser
}

install_chromium() {
  local sudo=() started=$SECONDS
  [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
  echo "ci: Chromium not found; installing it from Debian's packages" >&2
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    chromium >/dev/null
  echo "ci: Chromium installed in $((SECONDS - started)) s" >&2
}

ensure_chromium() {
  local bin
  bin=$(chromium_bin) || { install_chromium && bin=$(chromium_bin); }
  export MONORAY_TEST_CHROMIUM="$bin"
  echo "ci: $("$bin" --version 2>/dev/null) at $bin" >&2
}
