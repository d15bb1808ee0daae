#!/bin/sh
# Print %pre shell commands creating the users and groups a sysusers.d(5) file
# declares, like Fedora's sysusers.generate-pre.sh (for %sysusers_create_compat).
# Handles the "u" and "g" lines capkeeper uses: u NAME ID "GECOS" HOME SHELL.
set -eu
for file in "$@"; do
    # shellcheck disable=SC2016 # the awk program and the printed commands are literal
    awk '
        /^[ \t]*(#|$)/ { next }
        {
            type = $1; name = $2; id = $3; rest = $0
            gecos = ""
            if (match(rest, /"[^"]*"/)) { gecos = substr(rest, RSTART + 1, RLENGTH - 2); sub(/"[^"]*"/, "", rest) }
            n = split(rest, f, /[ \t]+/)
            home = (n >= 4 && f[4] != "-") ? f[4] : "/"
            shell = (n >= 5 && f[5] != "-") ? f[5] : "/usr/sbin/nologin"
            uid = (id != "-" && id ~ /^[0-9]+$/) ? " -u " id : ""
            if (type == "g" || type == "u") {
                printf "getent group %s >/dev/null || groupadd -r%s %s || :\n", name, (type == "g" ? uid : ""), name
            }
            if (type == "u") {
                printf "getent passwd %s >/dev/null || useradd -r%s -g %s -d %s -s %s -c \"%s\" %s || :\n", name, uid, name, home, shell, gecos, name
            }
        }' "$file"
done
