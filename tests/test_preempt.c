// test_preempt.c: preemption and write failures of a training run, through the real binary.
//
// SIGUSR1 (or SIGTERM) to a rank mid-run: every rank stops at the next step boundary, a
// checkpoint is saved, the exit code is 3, and `checkpoint.resume: auto` continues so that the
// losses of the interrupted and resumed runs together equal an uninterrupted run's, bitwise (CPU
// backend). Under mpirun only one rank gets the signal: the others must follow it. A log that
// cannot be written (/dev/full) ends the run with exit 1 and a message naming log.jsonl.
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define OUT_CAP (1 << 16)
#define STEPS 150

// The train-step losses of a JSON-lines log as printed ("loss":<text>), one per line, in order.
static int read_loss_texts(const char *path, char texts[][32], int max) {
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "cannot open %s", path);
    char line[1024];
    int n = 0;
    while (n < max && fgets(line, sizeof line, f)) {
        if (!strstr(line, "\"kind\":\"train\"")) continue;
        const char *p = strstr(line, "\"loss\":");
        cr_assert_not_null(p, "no loss in %s", line);
        p += 7;
        size_t k = strcspn(p, ",}");
        cr_assert_lt(k, 32);
        memcpy(texts[n], p, k);
        texts[n][k] = '\0';
        n++;
    }
    fclose(f);
    return n;
}

// Trains tiny.yaml for STEPS steps with np ranks (0: plain process) and tp, signalling one rank
// with sig once the log shows three steps; then resumes; checks exit codes and the losses against
// an uninterrupted run.
static void preempt_and_resume(int np, int tp, const char *sig) {
    char dir[256], out[OUT_CAP];
    tu_tmpdir(dir, sizeof dir, "preempt");
    char launch[512] = "";
    if (np > 0) snprintf(launch, sizeof launch, "'%s' %s -np %d", tu_mpiexec(), tu_mpiexec_flags(), np);
    char common[1024];
    snprintf(common, sizeof common,
             "%s '%s' configs/tiny.yaml --set train.steps=%d --set parallel.tp=%d --set eval.every=0 "
             "--set data.val=\"\"",
             launch, tu_tptrain(), STEPS, tp);
    // uninterrupted
    int rc = tu_run(out, sizeof out, "cd '%s' && timeout 300 %s --set log.jsonl='%s/full.jsonl'",
                    tu_source_root(), common, dir);
    cr_assert_eq(rc, 0, "uninterrupted run: exit %d\n%s", rc, out);
    // interrupted: the signal goes to one tptrain process of this run (its log path is unique)
    rc = tu_run(out, sizeof out,
                "cd '%s' && (timeout 300 %s --set log.jsonl='%s/a.jsonl' --set checkpoint.dir='%s/ck' "
                "> '%s/a.out' 2>&1; echo $? > '%s/a.rc') & "
                "for i in $(seq 1 600); do [ \"$(grep -c '\"kind\":\"train\"' '%s/a.jsonl' 2>/dev/null)\" -ge 3 ] "
                "&& break; sleep 0.05; done; "
                "pid=$(pgrep -f -- \"log.jsonl=%s/a.jsonl\" | while read p; do "
                "[ \"$(cat /proc/$p/comm)\" = tptrain ] && echo $p; done | head -n 1); "
                "[ -n \"$pid\" ] && kill -%s $pid; wait; cat '%s/a.out'; exit $(cat '%s/a.rc')",
                tu_source_root(), common, dir, dir, dir, dir, dir, dir, sig, dir, dir);
    cr_assert_eq(rc, 3, "the signalled run must exit 3 (preempted), got %d:\n%s", rc, out);
    cr_assert(strstr(out, "stopped by a signal after step"), "%s", out);
    cr_assert(strstr(out, "checkpoint saved"), "%s", out);
    // resumed
    rc = tu_run(out, sizeof out,
                "cd '%s' && timeout 300 %s --set log.jsonl='%s/b.jsonl' --set checkpoint.dir='%s/ck' "
                "--set checkpoint.resume=auto",
                tu_source_root(), common, dir, dir);
    cr_assert_eq(rc, 0, "resumed run: exit %d\n%s", rc, out);

    static char full[STEPS][32], a[STEPS][32], b[STEPS][32];
    char path[512];
    snprintf(path, sizeof path, "%s/full.jsonl", dir);
    int nf = read_loss_texts(path, full, STEPS);
    snprintf(path, sizeof path, "%s/a.jsonl", dir);
    int na = read_loss_texts(path, a, STEPS);
    snprintf(path, sizeof path, "%s/b.jsonl", dir);
    int nb = read_loss_texts(path, b, STEPS);
    cr_assert_eq(nf, STEPS);
    cr_assert(na >= 3 && na < STEPS, "the signal came after %d of %d steps", na, STEPS);
    cr_assert_eq(na + nb, STEPS, "interrupted %d + resumed %d steps != %d", na, nb, STEPS);
    for (int i = 0; i < STEPS; i++) {
        const char *got = i < na ? a[i] : b[i - na];
        cr_expect_str_eq(got, full[i], "step %d: loss %s, uninterrupted %s", i + 1, got, full[i]);
    }
    tu_rmtree(dir);
}

Test(preempt, sigusr1_saves_and_resumes_exactly) { preempt_and_resume(0, 1, "USR1"); }

Test(preempt, sigterm_saves_and_resumes_exactly) { preempt_and_resume(0, 1, "TERM"); }

Test(preempt, one_signalled_rank_stops_all_ranks) {
    tu_require_mpiexec();
    preempt_and_resume(2, 2, "USR1");
}

Test(preempt, full_disk_log_fails_the_run) {
    char out[OUT_CAP];
    int rc = tu_run(out, sizeof out,
                    "cd '%s' && timeout 120 '%s' configs/tiny.yaml --set train.steps=6 --set log.jsonl=/dev/full",
                    tu_source_root(), tu_tptrain());
    cr_assert_eq(rc, 1, "exit %d, want 1:\n%s", rc, out);
    cr_assert(strstr(out, "log.jsonl: writing '/dev/full' failed"), "%s", out);
}

// A checkpoint directory that cannot be used is found before step 1, not at the first save.
Test(preempt, unusable_checkpoint_dir_is_refused_before_training) {
    char dir[256], out[OUT_CAP], file[512];
    tu_tmpdir(dir, sizeof dir, "ckdir");
    tu_write_file(file, sizeof file, dir, "a_file", "not a directory\n");
    int rc = tu_run(out, sizeof out, "cd '%s' && timeout 120 '%s' configs/tiny.yaml --set checkpoint.dir='%s'",
                    tu_source_root(), tu_tptrain(), file);
    cr_assert_eq(rc, 2, "exit %d, want 2:\n%s", rc, out);
    cr_assert(strstr(out, "checkpoint.dir: ") && strstr(out, "is not a directory"), "%s", out);
    cr_assert(!strstr(out, "step "), "training ran before the directory was checked:\n%s", out);
    tu_rmtree(dir);
}

// A save that fails (a file-size limit stands in for a full disk) exits non-zero, leaves no
// .tmp directory and keeps `latest` on the previous checkpoint. UCX_TLS keeps MPICH's UCX off its
// file-backed shared memory, whose writes the size limit would stop first.
Test(preempt, failed_save_leaves_no_tmp_and_keeps_latest) {
    char dir[256], out[OUT_CAP];
    tu_tmpdir(dir, sizeof dir, "fullsave");
    int rc = tu_run(out, sizeof out, "cd '%s' && timeout 120 '%s' configs/tiny.yaml --set train.steps=6 "
                    "--set checkpoint.dir='%s/ck'", tu_source_root(), tu_tptrain(), dir);
    cr_assert_eq(rc, 0, "first run: exit %d\n%s", rc, out);
    rc = tu_run(out, sizeof out, "cd '%s' && (trap '' XFSZ; ulimit -f 8192; UCX_TLS=self,tcp timeout 120 '%s' configs/tiny.yaml "
                "--set train.steps=8 --set checkpoint.dir='%s/ck' --set checkpoint.resume=auto)",
                tu_source_root(), tu_tptrain(), dir);
    cr_assert_neq(rc, 0, "a save that cannot be written must fail the run:\n%s", out);
    cr_assert(strstr(out, "step_00000008"), "the message should name the checkpoint:\n%s", out);
    rc = tu_run(out, sizeof out, "ls -a '%s/ck'; cat '%s/ck/latest'", dir, dir);
    cr_assert(!strstr(out, ".tmp"), "a partial save was left behind:\n%s", out);
    cr_assert(strstr(out, "step_00000006\nstep_00000006") || strstr(out, "latest\nstep_00000006"),
              "latest must still name step 6:\n%s", out);
    cr_assert(!strstr(out, "step_00000008"), "%s", out);
    tu_rmtree(dir);
}

// --eval and resume hold the run to the model shape state.json recorded: n_head changes no tensor
// shape, and a width edited into config.yaml must be refused before anything is allocated from it.
Test(preempt, checkpoint_model_shape_is_enforced) {
    char dir[256], out[OUT_CAP];
    tu_tmpdir(dir, sizeof dir, "shape");
    int rc = tu_run(out, sizeof out, "cd '%s' && timeout 120 '%s' configs/tiny.yaml --set train.steps=6 "
                    "--set checkpoint.dir='%s/ck'", tu_source_root(), tu_tptrain(), dir);
    cr_assert_eq(rc, 0, "%s", out);
    rc = tu_run(out, sizeof out, "cd '%s' && timeout 120 '%s' --eval '%s/ck' --set model.n_head=2",
                tu_source_root(), tu_tptrain(), dir);
    cr_assert_eq(rc, 2, "exit %d:\n%s", rc, out);
    cr_assert(strstr(out, "model.n_head: the checkpoint") && strstr(out, "n_head=4, this run has 2"), "%s", out);
    rc = tu_run(out, sizeof out, "cd '%s' && timeout 120 '%s' configs/tiny.yaml --set train.steps=8 "
                "--set checkpoint.dir='%s/ck' --set checkpoint.resume=auto --set model.n_head=2",
                tu_source_root(), tu_tptrain(), dir);
    cr_assert_eq(rc, 2, "resume with another n_head: exit %d:\n%s", rc, out);
    cr_assert(strstr(out, "model.n_head"), "%s", out);
    rc = tu_run(out, sizeof out, "sed -i 's/n_embd: 64/n_embd: 1048576/' '%s/ck/step_00000006/config.yaml' && "
                "cd '%s' && timeout 60 '%s' --eval '%s/ck'", dir, tu_source_root(), tu_tptrain(), dir);
    cr_assert_eq(rc, 2, "an edited width must be refused before allocation: exit %d:\n%s", rc, out);
    cr_assert(strstr(out, "model.n_embd: the checkpoint"), "%s", out);
    tu_rmtree(dir);
}
