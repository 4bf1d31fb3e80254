// Command soak is `make soak`: thousands of containers through snapview in
// a private containerd (SOAK_CYCLES create→start→wait→delete cycles one
// after the other and again in 8 parallel streams, 500 containers in turn
// in one pod-grouped shim whose memory, open files and goroutines are
// sampled, 64 creates at once), then the leak check. It fails on any
// failed cycle, any leak, or open files or goroutines that grow.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/snapview/snapview/tests/e2e/harness"
)

const ns = "snapview-soak"

func main() {
	cfg := harness.SoakConfig{Runtime: "io.containerd.snapview.v2", Image: "docker.io/snapview/soak:latest", Progress: os.Stdout}
	flag.IntVar(&cfg.Cycles, "cycles", 1000, "create→start→wait→delete cycles, sequential and again in parallel streams")
	flag.IntVar(&cfg.Streams, "streams", 8, "parallel streams")
	flag.IntVar(&cfg.PodContainers, "pod", 500, "containers run in turn in one pod-grouped shim")
	flag.IntVar(&cfg.SampleEvery, "sample-every", 50, "sample the pod shim every this many containers")
	flag.IntVar(&cfg.Parallel, "parallel", 64, "creates at once")
	flag.StringVar(&cfg.Runtime, "runtime", cfg.Runtime, "the runtime to soak (io.containerd.runc.v2 gives runc's figures to compare with)")
	flag.Parse()
	if err := run(cfg); err != nil {
		fmt.Fprintln(os.Stderr, "soak failed:", err)
		os.Exit(1)
	}
}

func run(cfg harness.SoakConfig) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Hour)
	defer cancel()
	s, err := harness.NewSession(ctx, "the soak (run 'sudo make soak')", "snapview-soak-", false, harness.WithLogLevel("info"))
	if err != nil {
		return err
	}
	defer s.Close()
	img, err := harness.BuildImage(s.Dir, harness.ImageSpec{Ref: cfg.Image, KernelSize: 1 << 20})
	if err != nil {
		return err
	}
	if _, err := s.Daemon.Import(ctx, ns, img, "overlayfs"); err != nil {
		return err
	}
	ctx = harness.Context(ctx, ns)
	fmt.Printf("containerd %s, runtime %s\n", s.Daemon.Version, cfg.Runtime)
	rep, err := s.Daemon.Soak(ctx, cfg)
	if err != nil {
		return err
	}
	rep.Print(os.Stdout, cfg)
	flat, how := rep.Flat()
	fmt.Printf("pod shim over the run: %s\n", how)
	leaks := s.Daemon.CheckLeaks(ctx)
	if leaks == nil {
		fmt.Println("leaks: none")
	}
	switch {
	case len(rep.Failures) > 0:
		return fmt.Errorf("%d failures", len(rep.Failures))
	case leaks != nil:
		return leaks
	case !flat:
		return fmt.Errorf("the pod shim's open files or goroutines grew: %s", how)
	}
	return nil
}
