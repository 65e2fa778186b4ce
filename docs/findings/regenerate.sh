#!/bin/bash
# Every report of docs/findings.md from the jobs' records kept in the repository (docs/findings/runs, what
# queue.sh archives: results, configs, logs, no weights), or from any sweeps folder that docs/findings.md's
# commands write:
#   bash docs/findings/regenerate.sh [records or sweeps folder, default docs/findings/runs] [question ...]
# With question names (budget, methods_rt6, depth_sms6, ...) only those; a report whose sweeps are
# not all there, or a comparison one of whose arms has no counted job yet (report exit 3), is skipped and named. Each writes docs/findings/<question>.md and its plots.
# Exit 1 when a report failed or a question name is none of these (a typo would regenerate nothing).
root=$(cd "$(dirname "$0")/../.." && pwd) || exit 1
R=${1:-$root/docs/findings/runs}
[[ $R == /* ]] || R=$PWD/$R  # (a folder given is the caller's: the reports run from the repository root)
R=${R#$root/}  # (inside the repository: the reports name it relative, so their commands work in any clone)
shift
cd "$root" || exit 1
wanted=" $* " known=" " written=" " status=0
report() {  # report <question> <title> <sweep folder>... [report options]
    local name=$1 title=$2 folders=() options=()
    shift 2
    known+="$name "
    for arg in "$@"; do
        if [ ${#options[@]} -eq 0 ] && [[ $arg != --* ]]; then folders+=("$R/$arg"); else options+=("$arg"); fi
    done
    [ "$wanted" = "  " ] || [[ $wanted == *" $name "* ]] || return 0
    for folder in "${folders[@]}"; do
        [ -d "$folder" ] || { echo "skipped $name: no $folder"; return 0; }
    done
    local plots=(docs/findings/"$name"_*.png) plot said code
    said=$(python -m peft_lightning.report "${folders[@]}" "${options[@]}" --title "$title" \
        --out "docs/findings/$name.md" 2>&1 > /dev/null)
    code=$?
    if [ $code -eq 3 ]; then said=${said##*$'\n'}; echo "skipped $name: ${said#nothing to compare, no page written: }"; return 0; fi
    [ -z "$said" ] || echo "$said" >&2  # (warnings, or the error of a failed report)
    if [ $code -eq 0 ]; then echo "wrote docs/findings/$name.md"; written+="$name "
        # a plot of the old page whose axis is gone would stay beside the new one, shown by nothing: removed once
        # the new page is written (a report that fails keeps the old page and the plots it shows), and only if
        # no page shows it (the glob of a question `methods` would match methods_rt6's plots)
        for plot in "${plots[@]}"; do
            grep -qsF -e "(${plot##*/})" -e "/${plot##*/})" README.md docs/*.md docs/findings/*.md || rm -f "$plot"
        done
    else echo "FAILED $name" >&2; status=1; fi
}
RT="Rotten Tomatoes, MiniLM, 6 epochs, 3 seeds"
SMS="SMS spam, MiniLM, 6 epochs, 3 seeds"

report budget "Budget check: P-Tuning v2, 3 vs 6 epochs (Rotten Tomatoes, 3 seeds)" \
    methods_rt budget_rt --where method=ptuning_v2 --baseline trainer.max_epochs=3
report budget12 "Budget check: P-Tuning v2, 6 vs 12 epochs (Rotten Tomatoes, 3 seeds)" \
    budget_rt budget12_rt --where method=ptuning_v2 --baseline trainer.max_epochs=6
# methods_rt's records hold only P-Tuning v2's jobs (the budget check's 3-epoch arm, run again): the other methods'
# runs went with the 2026-11-29 sweeps folder. Paired against fine-tuning (the lost page's reference), the report
# finds no finetune job there and writes nothing (exit 3: skipped), so the lost runs' page stays as they wrote it.
report methods_3epochs "Every method at 3 epochs (Rotten Tomatoes, MiniLM, 3 seeds; a fixed small budget)" methods_rt \
    --baseline method=finetune
report transfer "Prompt transfer (SPoT): SMS spam prefix vs random, P-Tuning v2 on 50-1000 Rotten Tomatoes sentences, 300 updates, 3 seeds" \
    transfer_rt --baseline method.init=random

for task in rt sms; do
    if [ $task = rt ]; then on=$RT; ptv2=budget_rt; else on=$SMS; ptv2=methods_sms6; fi
    report methods_${task}6 "Every method ($on)" methods_${task}6 $([ $task = rt ] && echo budget_rt) \
        --baseline method=finetune
    report dropout_${task}6 "Backbone dropout on vs off, P-Tuning v2 ($on)" $ptv2 dropout_${task}6 \
        --where method=ptuning_v2 --baseline method.backbone_dropout=false
    report depth_${task}6 "Depth: deep vs embedding-only vs the top half, P-Tuning v2, P = 16 ($on)" $ptv2 depth_${task}6 \
        --where method=ptuning_v2 --baseline method.depth=deep
    report reparam_ptuning_v2_${task}6 "Reparameterization none vs MLP, P-Tuning v2 ($on)" $ptv2 reparam_${task}6 \
        --where method=ptuning_v2 --baseline method.reparameterization=none
    report reparam_prefix_tuning_${task}6 "Reparameterization MLP vs none, prefix tuning ($on)" methods_${task}6 reparam_${task}6 \
        --where method=prefix_tuning --baseline method.reparameterization=mlp
    report prefix_length_ptuning_v2_${task}6 "Prefix length 1-64, P-Tuning v2 ($on)" $ptv2 prefix_length_${task}6 \
        --where method=ptuning_v2 --baseline method.prefix_length=16
    report prefix_length_prompt_tuning_${task}6 "Prefix length 1-64, prompt tuning ($on)" methods_${task}6 prefix_length_${task}6 \
        --where method=prompt_tuning --baseline method.prefix_length=16
    report presets_ptuning_v2_${task}6 "The official settings' preset against our defaults, P-Tuning v2 ($on)" \
        $ptv2 presets_${task}6 --where method=ptuning_v2 --baseline experiment=null
    report presets_prefix_tuning_${task}6 "The official settings' preset against our defaults, prefix tuning ($on)" \
        methods_${task}6 presets_${task}6 --where method=prefix_tuning --baseline experiment=null
done
# prefix tuning's reparameterization pair on SMS spam at 12 epochs: its default (the MLP) had not flattened at 6
report reparam_prefix_tuning_sms12 "Reparameterization MLP vs none, prefix tuning (SMS spam, MiniLM, 12 epochs, 3 seeds)" \
    reparam_sms12 --where method=prefix_tuning --baseline method.reparameterization=mlp
# its official-settings preset there at 12 epochs too, against the same 12-epoch default (reparam_sms12's MLP arm)
report presets_prefix_tuning_sms12 "The official settings' preset against our defaults, prefix tuning (SMS spam, MiniLM, 12 epochs, 3 seeds)" \
    reparam_sms12 presets_sms12 --where method=prefix_tuning,method.reparameterization=mlp --baseline experiment=null
# the default still rising at 12 epochs: the pair and the preset again at 24 (the fourth change)
report reparam_prefix_tuning_sms24 "Reparameterization MLP vs none, prefix tuning (SMS spam, MiniLM, 24 epochs, 3 seeds)" \
    reparam_sms24 --where method=prefix_tuning --baseline method.reparameterization=mlp
report presets_prefix_tuning_sms24 "The official settings' preset against our defaults, prefix tuning (SMS spam, MiniLM, 24 epochs, 3 seeds)" \
    reparam_sms24 presets_sms24 --where method=prefix_tuning,method.reparameterization=mlp --baseline experiment=null
# paired against deep prefix tuning, Table 5's prefix row (fixed after its first job, before any other arm ran)
report city_facts "SmolLM2 data-to-text (city_facts): deep prefix vs embedding-only prefix vs LoRA, 3 seeds" city_facts \
    --baseline method=prefix_tuning,method.depth=deep
# the README's methods table is made from the methods report (docs/findings/readme_table.py)
if [[ $written == *" methods_rt6 "* ]]; then python docs/findings/readme_table.py || status=1; fi
# docs/findings.md's verdict table is made from the question pages by its rules (docs/findings/verdicts.py)
if [[ $written =~ (dropout|depth|reparam|prefix_length|presets)_ ]]; then python docs/findings/verdicts.py || status=1; fi
for question in "$@"; do
    [[ $known == *" $question "* ]] || { echo "no question named $question (they are:$known)" >&2; status=1; }
done
exit $status
