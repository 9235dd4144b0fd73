#!/bin/sh
# The menu dialogue of docs/MENU.md as an exec program: preforkd's `exec`
# plugin runs it per connection with the socket as stdin and stdout.
# POSIX sh only. It speaks the socketserver tutorial's texts (the 10086
# hotline), or English with MENU_LANG=en in the environment (the config's
# `env` option).
#
# A choice is a line, or what one read delivered after its last newline
# (the tutorial's client sends a choice with no newline and waits): `dd`
# makes exactly one read(2) of at most 1024 bytes, so a long line is
# answered in pieces and never held whole.

if [ "${MENU_LANG:-zh}" = en ]; then
    banner='Welcome to the preforkd menu. Please choose: 0 to talk to an operator, exit to leave.'
    operator='Your call is being transferred to an operator.'
    again='Invalid choice. Please choose again: 0 to talk to an operator, exit to leave.'
    goodbye='Goodbye.'
else
    banner='欢迎致电 10086,请输入1xxx,0转人工服务.'
    operator='通过可能会被录音.balabala一大推'
    again='请重新输入.'
    goodbye=''
fi

nl=$(printf '\nx')
nl=${nl%x}
cr=$(printf '\r')

# Answers one choice; fails when the caller is let go.
answer() {
    line=${1%"$cr"}
    # Surrounding spaces and tabs.
    while :; do
        case $line in
            [' 	']*) line=${line#?} ;;
            *[' 	']) line=${line%?} ;;
            *) break ;;
        esac
    done
    case $line in
        0) printf '%s\n' "$operator" ;;
        exit) [ -n "$goodbye" ] && printf '%s\n' "$goodbye"; return 1 ;;
        *) printf '%s\n' "$again" ;;
    esac
}

printf '%s\n' "$banner"
while :; do
    # `; echo x` keeps the trailing newlines the substitution would strip.
    chunk=$(dd bs=1024 count=1 2>/dev/null; echo x)
    chunk=${chunk%x}
    [ -n "$chunk" ] || exit 0 # the caller closed: close without a word
    chunk=${chunk%"$nl"}
    while :; do
        case $chunk in
            *"$nl"*)
                answer "${chunk%%"$nl"*}" || exit 0
                chunk=${chunk#*"$nl"}
                ;;
            *)
                answer "$chunk" || exit 0
                break
                ;;
        esac
    done
done
