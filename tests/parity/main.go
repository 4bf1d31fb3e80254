// Command parity is `make parity`: containerd's own client integration suite
// (integration/client of the containerd module, compiled unchanged at each
// daemon's own tag) runs against io.containerd.runc.v2 and then
// io.containerd.snapview.v2 (TEST_RUNTIME), on the newest and on the oldest
// supported containerd. The suite pulls its images; here they are built from
// Debian's static busybox and served under the suite's own image names by a
// registry behind an HTTPS proxy on loopback (see proxy.go). Any test that passes with runc and fails with
// snapview fails the run; such a test is run again alone, on both runtimes,
// before it counts, so that a flake of the machine is not taken for a
// difference. After each snapview run nothing of the shim may be left on the
// host (mounts and loop devices under the suite's directories, shim
// processes).
//
// The suite starts its own containerd with fixed directories
// (/var/lib/containerd-test, /run/containerd-test) and removes them
// afterwards, so runs are sequential.
package main

import (
	"archive/tar"
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/moby/sys/mountinfo"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/snapview/snapview/tests/e2e/harness"
)

const (
	runcRT     = "io.containerd.runc.v2"
	snapviewRT = "io.containerd.snapview.v2"
	// The suite's fixed directories (integration/client/client_unix.go).
	suiteRoot  = "/var/lib/containerd-test"
	suiteState = "/run/containerd-test"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "parity:", err)
		os.Exit(1)
	}
}

type options struct {
	run      string
	cache    string
	timeout  time.Duration
	daemons  string
	attempts int
	// oci is the OCI runtime under both shims: runc, or runsc (gVisor).
	oci string
	// ociDir, for runsc, holds a `runc` that runs it, first in the suite's PATH.
	ociDir string
	// viewSources are the view.source settings snapview runs the suite
	// with, each compared with runc's one run.
	viewSources string
}

func run() error {
	var o options
	flag.StringVar(&o.run, "run", "", "run only the suite's tests matching this regular expression (go test -run)")
	flag.StringVar(&o.cache, "cache", ".cache/parity", "where the compiled suites and the logs go")
	flag.DurationVar(&o.timeout, "timeout", 40*time.Minute, "time limit of one run of the suite")
	flag.StringVar(&o.daemons, "daemons", "newest,compat", "which containerd builds to run on")
	flag.IntVar(&o.attempts, "attempts", 2, "times a differing test is run again alone before it counts")
	flag.StringVar(&o.oci, "oci-runtime", "runc", "the OCI runtime under both shims: runc, or runsc (gVisor's, as the runc the shims find first in PATH)")
	flag.StringVar(&o.viewSources, "view-sources", "snapshotter,layers", "the view.source settings to run snapview with, each compared with runc (through $SNAPVIEW_CONFIG)")
	flag.Parse()
	if os.Getuid() != 0 {
		return fmt.Errorf("containerd's client suite needs root: run 'sudo make parity'")
	}
	if err := os.MkdirAll(o.cache, 0o755); err != nil {
		return err
	}
	cache, err := filepath.Abs(o.cache)
	if err != nil {
		return err
	}
	o.cache = cache
	switch o.oci {
	case "runc":
	case "runsc":
		if o.ociDir, err = runscAsRunc(o.cache); err != nil {
			return err
		}
	default:
		return fmt.Errorf("-oci-runtime %q: want runc or runsc", o.oci)
	}

	imgs, err := suiteImages()
	if err != nil {
		return err
	}
	reg, err := startRegistry(imgs)
	if err != nil {
		return err
	}
	defer reg.close()
	px, err := startProxy(reg, o.cache)
	if err != nil {
		return err
	}
	defer px.close()

	var failed []string
	for which := range strings.SplitSeq(o.daemons, ",") {
		tools, err := harness.ToolsFromEnv(which == "compat")
		if err != nil {
			return err
		}
		version, err := containerdVersion(tools.Containerd)
		if err != nil {
			return err
		}
		bin, err := compileSuite(version, o.cache)
		if err != nil {
			return err
		}
		// The run uses a copy of the shim: rebuilding it meanwhile must not
		// change the shim under test halfway.
		if tools.Shim, err = copyShim(tools.Shim, o.cache); err != nil {
			return err
		}
		s := &suite{opts: o, version: version, bin: bin, env: px.env(), tools: tools,
			tmp: filepath.Join(o.cache, "tmp-"+o.oci), hung: map[string][]string{}}
		diff, err := s.compare()
		if err != nil {
			return fmt.Errorf("containerd %s: %w", version, err)
		}
		for _, d := range diff {
			failed = append(failed, version+" "+d)
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d test(s) pass with runc and fail with snapview:\n  %s", len(failed), strings.Join(failed, "\n  "))
	}
	fmt.Printf("\nparity: no test of containerd's client suite passes with runc and fails with snapview (OCI runtime %s under both)\n", o.oci)
	return nil
}

// suiteImages builds the images the suite pulls, named as the suite names
// them (the registry host aside): busybox (also pulled by digest),
// volume-copy-up, volume-ownership and pause, with the content of
// containerd's own test images in the parts the tests look at.
func suiteImages() (map[string]*harness.OCIImage, error) {
	out, err := exec.Command(harness.BusyboxPath, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("list busybox applets: %w", err)
	}
	applets := strings.Fields(string(out))
	cfg := ocispec.ImageConfig{Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, Cmd: []string{"sh"}}
	imgs := map[string]*harness.OCIImage{}
	add := func(name string, cfg ocispec.ImageConfig, extra ...*harness.Layer) error {
		base, err := harness.BusyboxLayer(applets)
		if err != nil {
			return err
		}
		img, err := harness.Compose(name, cfg, append([]*harness.Layer{base, busyboxLike()}, extra...)...)
		imgs[name] = img
		return err
	}
	if err := add("containerd/busybox:1.36", cfg); err != nil {
		return nil, err
	}

	copyUp := harness.NewLayer().
		Dir("test_dir", 0o755).File("test_dir/test_file", 0o644, []byte("test_content\n")).
		Dir("C:", 0o755).Dir("C:/weird_test_dir", 0o755).File("C:/weird_test_dir/weird_test_file", 0o644, []byte("test_content\n")).
		Dir(":colon_prefixed", 0o755).File(":colon_prefixed/colon_prefixed_file", 0o644, []byte("test_content\n"))
	vcfg := cfg
	vcfg.Volumes = map[string]struct{}{"/test_dir": {}, "C:/weird_test_dir": {}, "/:colon_prefixed": {}}
	if err := add("containerd/volume-copy-up:2.2", vcfg, copyUp); err != nil {
		return nil, err
	}

	// An Ubuntu image in containerd's suite: /test_dir owned by nobody,
	// bash, and a setuid /usr/bin/passwd for the user-namespace tests.
	owned := harness.NewLayer().
		Entry(tarDir("test_dir", 65534, 65534)).
		Dir("usr", 0o755).Dir("usr/bin", 0o755).
		Entry(tar.Header{Typeflag: tar.TypeReg, Name: "usr/bin/passwd", Mode: 0o4755})
	ocfg := cfg
	ocfg.Volumes = map[string]struct{}{"/test_dir": {}}
	if err := add("containerd/volume-ownership:2.1", ocfg, owned); err != nil {
		return nil, err
	}

	pause := ocispec.ImageConfig{Entrypoint: []string{"/pause"}}
	for _, tag := range []string{"pause:3.10.2", "pause:3.6"} {
		if err := add(tag, pause, harness.NewLayer().File("pause", 0o755, []byte("#!/bin/sh\ntrap 'exit 0' TERM INT\nwhile :; do sleep 3600 & wait $!; done\n"))); err != nil {
			return nil, err
		}
	}
	return imgs, nil
}

// busyboxLike makes the busybox base look like the upstream busybox image
// where the suite looks: its users (www-data is uid 33), bash, and an nc
// that a SIGTERM ends, as upstream's does even as a namespace's init
// (TestBindLowPortNonOpt; Debian's nc installs no handler, so there the
// signal is ignored and the test hangs).
func busyboxLike() *harness.Layer {
	passwd := `root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
`
	group := `root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
mail:x:8:
www-data:x:33:
users:x:100:
nogroup:x:65534:
`
	return harness.NewLayer().
		Dir("etc", 0o755).
		File("etc/passwd", 0o644, []byte(passwd)).
		File("etc/group", 0o644, []byte(group)).
		Dir("bin", 0o755).
		File("bin/bash", 0o755, []byte("#!/bin/sh\nexec /bin/sh \"$@\"\n")).
		File("bin/nc", 0o755, []byte("#!/bin/sh\ntrap 'kill $pid 2>/dev/null; exit 143' TERM\n/bin/busybox nc \"$@\" &\npid=$!\nwait $pid\n"))
}

// runscPath is Debian's gVisor runsc (hack/install-deps.sh installs it).
const runscPath = "/usr/bin/runsc"

// runscAsRunc writes, in a directory of its own under cache, a `runc` that
// runs gVisor's runsc with the flags it needs here, and returns the
// directory. Both shims run the OCI runtime `runc` from PATH when the
// options name no other, as the suite's containers do; runsc refuses to
// start a container in the host's network namespace unless told
// --network=none, and uses its default platform, ptrace (its kvm
// platform hangs on this kind of machine).
func runscAsRunc(cache string) (string, error) {
	if _, err := os.Stat(runscPath); err != nil {
		return "", fmt.Errorf("gVisor's runsc is not installed (the Debian package runsc; hack/install-deps.sh): %w", err)
	}
	dir := filepath.Join(cache, "runsc-as-runc")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	script := "#!/bin/sh\nexec " + runscPath + " --network=none \"$@\"\n"
	return dir, os.WriteFile(filepath.Join(dir, "runc"), []byte(script), 0o755)
}

func copyShim(shim, cache string) (string, error) {
	data, err := os.ReadFile(shim)
	if err != nil {
		return "", err
	}
	dst := filepath.Join(cache, "bin", filepath.Base(shim))
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return "", err
	}
	tmp := dst + ".tmp"
	if err := os.WriteFile(tmp, data, 0o755); err != nil {
		return "", err
	}
	return dst, os.Rename(tmp, dst)
}

func containerdVersion(bin string) (string, error) {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", bin, err)
	}
	f := strings.Fields(string(out))
	if len(f) < 3 {
		return "", fmt.Errorf("%s --version: %q", bin, out)
	}
	v, _, _ := strings.Cut(f[2], "+")
	if !strings.HasPrefix(v, "v") {
		v = "v" + v
	}
	return v, nil
}

// compileSuite compiles integration/client of the containerd module at
// version, from the Go module cache, once.
func compileSuite(version, cache string) (string, error) {
	bin := filepath.Join(cache, "client-"+version+".test")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	modcache, err := exec.Command("go", "env", "GOMODCACHE").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMODCACHE: %w", err)
	}
	dir := filepath.Join(strings.TrimSpace(string(modcache)), "github.com/containerd/containerd/v2@"+version)
	if _, err := os.Stat(dir); err != nil {
		dl := exec.Command("go", "mod", "download", "github.com/containerd/containerd/v2@"+version)
		dl.Stdout, dl.Stderr = os.Stderr, os.Stderr
		if err := dl.Run(); err != nil {
			return "", fmt.Errorf("download containerd %s: %w", version, err)
		}
	}
	fmt.Printf("==> compiling containerd %s's client integration suite (once)\n", version)
	cmd := exec.Command("go", "test", "-c", "-o", bin, "./integration/client")
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("compile integration/client at %s: %w", version, err)
	}
	return bin, nil
}

type suite struct {
	opts    options
	version string
	bin     string
	env     []string
	tools   harness.Tools
	// tmp is the suite's TMPDIR, so that what a hung test left there can
	// be found and cleared.
	tmp string
	// hung lists, per runtime, the tests that hung and were ended.
	hung map[string][]string
	// viewEnv is the environment of snapview's runs: the configuration
	// file of the view.source under test.
	viewEnv []string
}

// results maps a test (or subtest) name to PASS, FAIL or SKIP.
type results map[string]string

var resultLine = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): (\S+) \(`)

// runSuite runs the suite (or the tests matching run) on runtime rt and
// returns the results and the log file that has its output. A test that hangs
// (no output for idleLimit) is ended, counted as failed and noted in
// hung, what it left on the host is cleared, and the suite goes on past
// it in a new process: gVisor hangs in some of the suite's tests under
// either shim.
func (s *suite) runSuite(rt, run, logName string) (results, string, error) {
	if s.opts.oci != "runc" {
		logName = s.opts.oci + "-" + logName // beside runc's logs, not over them
	}
	logPath := filepath.Join(s.opts.cache, logName)
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, "", err
	}
	defer logFile.Close()
	res := results{}
	var skip []string
	for {
		hung, err := s.invoke(rt, run, skip, logFile, res)
		if err != nil {
			return nil, "", err
		}
		if len(hung) == 0 {
			break
		}
		fmt.Printf("    %s hung on %s (no output for %s): ended, counted as failed, and the suite goes on after it\n", strings.Join(hung, ", "), short(rt), idleLimit)
		for _, h := range hung {
			s.hung[rt] = append(s.hung[rt], h)
			res[h] = "FAIL"
		}
		clearHost(s.tmp)
		skip = skip[:0]
		for name := range res {
			if !strings.Contains(name, "/") {
				skip = append(skip, regexp.QuoteMeta(name))
			}
		}
		sort.Strings(skip)
	}
	if len(res) == 0 {
		return nil, "", fmt.Errorf("no test results from %s on %s (see %s)", s.bin, rt, logPath)
	}
	return res, logPath, nil
}

// drain reads lines until the binary's output ends.
func drain(lines <-chan string) {
	for range lines {
		continue
	}
}

// idleLimit is how long a test may print nothing before it counts as hung.
// The whole suite takes under two minutes on runc.
const idleLimit = 2 * time.Minute

// stateLine is the test binary's note that a top-level test runs, pauses
// (t.Parallel, waiting for the serial tests to end) or continues.
var stateLine = regexp.MustCompile(`^=== (RUN|PAUSE|CONT)\s+([^/\s]+)$`)

// invoke runs the suite's binary once, adding what it reports to res, and
// returns the top-level tests that hung, if any did: those running (not
// paused) without a result when the output stopped.
func (s *suite) invoke(rt, run string, skip []string, logFile *os.File, res results) ([]string, error) {
	args := []string{"-test.v", "-test.root", "-test.timeout", s.opts.timeout.String(), "-no-criu"}
	if run != "" {
		args = append(args, "-test.run", run)
	}
	if len(skip) > 0 {
		args = append(args, "-test.skip", "^("+strings.Join(skip, "|")+")$")
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.timeout+time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, s.bin, args...)
	cmd.Dir = s.opts.cache
	path := strings.Join([]string{filepath.Dir(s.tools.Containerd), filepath.Dir(s.tools.Shim), filepath.Dir(s.tools.Runc), os.Getenv("PATH")}, ":")
	if s.opts.ociDir != "" {
		path = s.opts.ociDir + ":" + path
	}
	if err := os.MkdirAll(s.tmp, 0o755); err != nil {
		return nil, err
	}
	cmd.Env = append(append(os.Environ(), "PATH="+path, "TEST_RUNTIME="+rt, "TMPDIR="+s.tmp), s.env...)
	if rt == snapviewRT {
		cmd.Env = append(cmd.Env, s.viewEnv...)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(io.TeeReader(out, logFile))
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	running := map[string]bool{}
	var hung []string
	idle := time.NewTimer(idleLimit)
	defer idle.Stop()
loop:
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				break loop
			}
			if !idle.Stop() {
				<-idle.C
			}
			idle.Reset(idleLimit)
			if m := stateLine.FindStringSubmatch(l); m != nil {
				running[m[2]] = m[1] != "PAUSE"
			}
			if m := resultLine.FindStringSubmatch(l); m != nil {
				res[m[2]] = m[1]
			}
		case <-idle.C:
			for name, on := range running {
				if on && res[name] == "" {
					hung = append(hung, name)
				}
			}
			sort.Strings(hung)
			if len(hung) == 0 {
				fmt.Printf("    the suite's process on %s printed nothing for %s outside any test: ended\n", short(rt), idleLimit)
			}
			// SIGQUIT: the binary prints its goroutines into the log, and exits.
			_ = cmd.Process.Signal(syscall.SIGQUIT)
			time.AfterFunc(10*time.Second, func() { _ = cmd.Process.Kill() })
			drain(lines)
			break loop
		}
	}
	// The suite's own verdict is not ours: its failures are compared.
	_ = cmd.Wait()
	return hung, nil
}

// compare runs the suite on runc, then on snapview once per view source,
// retries what differs, prints a summary of each and returns the tests that
// pass with runc and fail with snapview (with the source, when not the
// default).
func (s *suite) compare() ([]string, error) {
	s.clearAfter() // what an earlier run under gVisor left would fail this one's creates
	runc, runcLeft, _, err := s.runOnce(runcRT, "")
	if err != nil {
		return nil, err
	}
	var confirmed []string
	for source := range strings.SplitSeq(s.opts.viewSources, ",") {
		if err := s.useViewSource(source); err != nil {
			return nil, err
		}
		res, left, logPath, err := s.runOnce(snapviewRT, source)
		if err != nil {
			return nil, err
		}
		if err := checkViewSource(logPath, source); err != nil {
			return nil, err
		}
		if s.opts.oci != "runc" {
			// gVisor leaves sandboxes, shims and mounts behind under runc's
			// shim too: what counts is what snapview's run left that runc's
			// did not.
			if leaks := newLeftovers(runcLeft, left); len(leaks) > 0 {
				return nil, fmt.Errorf("left on the host after the snapview run (view.source %s), and not after runc's:\n  %s", source, strings.Join(leaks, "\n  "))
			}
			fmt.Printf("    left on the host by the run on snapview: %d, none that runc's run did not leave (cleared)\n", len(left))
		} else if leaks := hostLeaks(s.tools.Shim); len(leaks) > 0 {
			return nil, fmt.Errorf("left on the host after the snapview run (view.source %s):\n  %s", source, strings.Join(leaks, "\n  "))
		}
		var these []string
		for _, name := range differences(runc, res) {
			if s.stillDiffers(name) {
				these = append(these, name)
			} else {
				fmt.Printf("    %s differed once but not when run again alone: counted as a flake\n", name)
			}
		}
		s.summary(map[string]results{runcRT: runc, snapviewRT: res}, these, source)
		for _, name := range these {
			if source != "snapshotter" {
				name += " (view.source " + source + ")"
			}
			confirmed = append(confirmed, name)
		}
	}
	return confirmed, nil
}

// runOnce runs the whole suite on rt (with view.source source, for
// snapview), and returns its results, under gVisor what it left on the
// host (cleared), and its log file.
func (s *suite) runOnce(rt, source string) (results, []string, string, error) {
	label, logName := short(rt), fmt.Sprintf("client-%s-%s.log", s.version, short(rt))
	if source != "" && source != "snapshotter" {
		label += " (view.source " + source + ")"
		logName = fmt.Sprintf("client-%s-%s-%s.log", s.version, short(rt), source)
	}
	fmt.Printf("==> containerd %s: client suite on %s\n", s.version, label)
	start := time.Now()
	res, logPath, err := s.runSuite(rt, s.opts.run, logName)
	if err != nil {
		return nil, nil, "", err
	}
	fmt.Printf("    %d tests and subtests in %s\n", len(res), time.Since(start).Round(time.Second))
	if s.opts.oci == "runc" {
		return res, nil, logPath, nil
	}
	left := leftovers(s.tmp)
	clearHost(s.tmp)
	if rt == runcRT {
		fmt.Printf("    left on the host by the run on runc's shim: %d (cleared)\n", len(left))
	}
	return res, left, logPath, nil
}

// checkViewSource checks, in the log of snapview's run with source (the
// suite prints containerd's log, the shims' included, at its end), that
// its views came from that source: the setting reached the shims.
func checkViewSource(logPath, source string) error {
	raw, err := os.ReadFile(logPath)
	if err != nil {
		return err
	}
	mounted := regexp.MustCompile(`msg="snapview: view mounted".*source=(\w+)`).FindAllSubmatch(raw, -1)
	n := 0
	for _, m := range mounted {
		if string(m[1]) == source {
			n++
		}
	}
	if n == 0 {
		return fmt.Errorf("the run on snapview with view.source %s mounted no view from that source (%d views mounted): the setting did not reach the shims", source, len(mounted))
	}
	fmt.Printf("    views mounted: %d, of them from view.source %s: %d\n", len(mounted), source, n)
	return nil
}

// useViewSource makes snapview's next runs use view.source source, through
// a configuration file named by $SNAPVIEW_CONFIG, which the suite's
// containerd passes on to the shims it starts (the suite's containers
// carry no runtime options).
func (s *suite) useViewSource(source string) error {
	switch source {
	case "snapshotter", "layers":
	default:
		return fmt.Errorf("-view-sources: %q is not a view.source (snapshotter, layers)", source)
	}
	file := filepath.Join(s.opts.cache, "snapview-"+source+".toml")
	if err := os.WriteFile(file, fmt.Appendf(nil, "[view]\nsource = %q\n", source), 0o644); err != nil {
		return err
	}
	s.viewEnv = []string{"SNAPVIEW_CONFIG=" + file}
	return nil
}

// stillDiffers runs one test alone on both runtimes up to opts.attempts
// times, and reports whether it passed with runc and failed with snapview
// every time.
func (s *suite) stillDiffers(name string) bool {
	top, _, _ := strings.Cut(name, "/")
	run := "^" + regexp.QuoteMeta(top) + "$"
	for i := 0; i < s.opts.attempts; i++ {
		r, _, err := s.runSuite(runcRT, run, fmt.Sprintf("retry-%s-%s-runc.log", s.version, top))
		s.clearAfter()
		if err != nil {
			return true
		}
		v, _, err := s.runSuite(snapviewRT, run, fmt.Sprintf("retry-%s-%s-snapview.log", s.version, top))
		s.clearAfter()
		if err != nil {
			return true
		}
		if r[name] != "PASS" || v[name] == "PASS" {
			return false
		}
	}
	return true
}

// clearAfter clears the host after a run under gVisor, which leaves things
// behind under either shim; after runc, the leak check judges the host as
// it is.
func (s *suite) clearAfter() {
	if s.opts.oci != "runc" {
		clearHost(s.tmp)
	}
}

// differences lists the tests that passed with runc and did not pass with
// snapview (failed, or never reported).
func differences(runc, snapview results) []string {
	var out []string
	for name, r := range runc {
		if r == "PASS" && snapview[name] != "PASS" && snapview[name] != "SKIP" {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

func (s *suite) summary(all map[string]results, diff []string, source string) {
	count := func(res results, top bool, verdict string) int {
		n := 0
		for name, v := range res {
			if strings.Contains(name, "/") != top && v == verdict {
				n++
			}
		}
		return n
	}
	fmt.Printf("\ncontainerd %s, client integration suite (%s), snapview with view.source %s\n", s.version, s.bin, source)
	fmt.Printf("  %-28s %10s %10s\n", "", "runc", "snapview")
	for _, v := range []string{"PASS", "FAIL", "SKIP"} {
		fmt.Printf("  %-28s %10d %10d\n", "top-level tests "+strings.ToLower(v), count(all[runcRT], true, v), count(all[snapviewRT], true, v))
	}
	for _, v := range []string{"PASS", "FAIL", "SKIP"} {
		fmt.Printf("  %-28s %10d %10d\n", "subtests "+strings.ToLower(v), count(all[runcRT], false, v), count(all[snapviewRT], false, v))
	}
	var both []string
	for name, v := range all[runcRT] {
		if v == "FAIL" && all[snapviewRT][name] == "FAIL" && !strings.Contains(name, "/") {
			both = append(both, name)
		}
	}
	sort.Strings(both)
	if len(both) > 0 {
		fmt.Printf("  fail with both runtimes (not a difference): %s\n", strings.Join(both, ", "))
	}
	var better []string
	for name, v := range all[snapviewRT] {
		if v == "PASS" && all[runcRT][name] == "FAIL" {
			better = append(better, name)
		}
	}
	sort.Strings(better)
	if len(better) > 0 {
		fmt.Printf("  pass with snapview only (flakes of runc's run): %s\n", strings.Join(better, ", "))
	}
	for _, rt := range []string{runcRT, snapviewRT} {
		if h := slices.Compact(slices.Sorted(slices.Values(s.hung[rt]))); len(h) > 0 {
			fmt.Printf("  hung on %s (ended after %s without output, counted as failed): %s\n", short(rt), idleLimit, strings.Join(h, ", "))
		}
	}
	if len(diff) == 0 {
		fmt.Println("  passes with runc and fails with snapview: none")
	} else {
		fmt.Printf("  passes with runc and fails with snapview: %s\n", strings.Join(diff, ", "))
	}
}

// hostLeaks lists what a run left on the host: mounts and loop devices
// under the suite's directories, and shim processes of snapview.
func hostLeaks(shim string) []string {
	var leaks []string
	for _, dir := range []string{suiteRoot, suiteState} {
		ms, _ := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
		for _, m := range ms {
			leaks = append(leaks, fmt.Sprintf("mount %s (%s)", m.Mountpoint, m.FSType))
		}
		for _, l := range harness.LoopDevices(dir) {
			leaks = append(leaks, "loop device "+l)
		}
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err == nil && exe == shim {
			leaks = append(leaks, "shim process "+e.Name())
		}
	}
	if len(leaks) > 0 {
		// Leave the next run a clean host.
		for _, dir := range []string{suiteRoot, suiteState} {
			_ = mount.UnmountRecursive(dir, 0)
		}
	}
	return leaks
}

func short(rt string) string {
	s := strings.TrimPrefix(rt, "io.containerd.")
	return strings.TrimSuffix(s, ".v2")
}

// tarDir is a directory entry owned by uid:gid.
func tarDir(name string, uid, gid int) tar.Header {
	return tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: 0o755, Uid: uid, Gid: gid}
}
