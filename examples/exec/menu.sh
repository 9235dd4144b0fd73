#!/bin/sh
# The menu dialogue of docs/MENU.md as an exec program: preforkd's `exec`
# plugin runs it per connection with the socket as stdin and stdout.
# POSIX sh only. A line longer than 1024 bytes is an invalid choice; the
# shell holds such a line whole while reading it (plain sh cannot bound
# `read`), so the config bounds each run with `timeout`.

banner='Welcome to the preforkd menu. Please choose: 0 to talk to an operator, exit to leave.'
again='Invalid choice. Please choose again: 0 to talk to an operator, exit to leave.'

printf '%s\n' "$banner"
# `read -r` keeps backslashes; IFS= keeps the spaces, which are stripped below.
while IFS= read -r line || [ -n "$line" ]; do
    # A trailing \r, then surrounding spaces and tabs.
    cr=$(printf '\r')
    line=${line%"$cr"}
    while :; do
        case $line in
            [' 	']*) line=${line#?} ;;
            *[' 	']) line=${line%?} ;;
            *) break ;;
        esac
    done
    case $line in
        0) printf '%s\n' 'Your call is being transferred to an operator.' ;;
        exit) printf '%s\n' 'Goodbye.'; exit 0 ;;
        *) printf '%s\n' "$again" ;;
    esac
done
exit 0
