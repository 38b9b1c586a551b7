#!/bin/sh
# Horovod Elastic host discovery for dho2_tf: print one "host:slots" line per usable host.
#
#   DHO2_ELASTIC_HOSTS_FILE  file with one "host:slots" per line ('#' comments allowed), re-read
#                            on every call: edit it to add or retire hosts while a job runs.
#   DHO2_ELASTIC_HOSTS       used when no file is given: space-separated "host:slots" entries.
#                            Defaults to "localhost:2 127.0.0.1:1", two names for this machine
#                            (the trick Horovod's own CI uses), so a failed worker blacklists
#                            only one of them. Horovod blacklists the whole host of a failed
#                            worker, survivors on it included: to lose only the failed worker,
#                            give every worker its own name ("localhost:1 127.0.0.1:1").
#   DHO2_ELASTIC_DRAIN       optional folder: a file named after a host (e.g. "$DIR/127.0.0.1")
#                            drops that host, which retires its workers at the next commit.
#
# horovodrun runs this script about once a second with its own environment, e.g.
#   horovodrun --gloo -np 3 --min-np 2 --max-np 3 \
#       --host-discovery-script jobs/elastic/discover_hosts.sh python jobs/train_elastic.py
# Add --network-interface lo when the job may start with a single host name: without it an
# elastic horovodrun waits for two hosts to agree on a network interface.
if [ -n "$DHO2_ELASTIC_HOSTS_FILE" ]; then
    hosts=$(grep -v '^[[:space:]]*#' "$DHO2_ELASTIC_HOSTS_FILE")
else
    hosts=${DHO2_ELASTIC_HOSTS:-localhost:2 127.0.0.1:1}
fi
for entry in $hosts; do
    host=${entry%%:*}
    if [ -n "$DHO2_ELASTIC_DRAIN" ] && [ -e "$DHO2_ELASTIC_DRAIN/$host" ]; then
        continue
    fi
    echo "$entry"
done
