// pynydus-stargz: the stargz peer for bench/lazy_pull.py.
//
// Debian bookworm packages stargz-snapshotter's library sources
// (golang-github-containerd-stargz-snapshotter-dev 0.12.0) but not its daemon
// (cmd/containerd-stargz-grpc), and the library's service/resolver package
// needs k8s.io/cri-api, which bookworm lacks. So this main composes the
// snapshotter one level lower, from the same building blocks upstream's daemon
// uses: the stargz FUSE filesystem (fs.NewFilesystem), the remote-aware
// overlay snapshotter (snapshot.NewSnapshotter) and containerd's snapshot gRPC
// service. Layer sources come from the default labels ctr-remote rpull sets
// (containerd.io/snapshot/remote/stargz.*). Registry hosts listed with -plain-http
// are spoken to over plain HTTP; all others over HTTPS with no credentials
// (the benchmark registry is anonymous). No metrics or debug listeners, no
// CRI/kubeconfig keychains: what the benchmark does not exercise is left out.
//
// Build: bench/stargz/build.sh (GOPATH mode over /usr/share/gocode).
package main

import (
	"context"
	"flag"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "", "unix socket to serve containerd's snapshot API on")
	root := flag.String("root", "", "state directory (snapshots, FUSE mounts, cache)")
	configPath := flag.String("config", "", "optional TOML with stargz fs settings (noprefetch, no_background_fetch, ...)")
	plainHTTP := flag.String("plain-http", "", "comma-separated registry hosts spoken to over plain HTTP")
	level := flag.String("log-level", "info", "logrus level")
	flag.Parse()
	if *address == "" || *root == "" {
		logrus.Fatal("-address and -root are required")
	}
	lvl, err := logrus.ParseLevel(*level)
	if err != nil {
		logrus.Fatalf("-log-level: %v", err)
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: time.RFC3339Nano})
	ctx := log.WithLogger(context.Background(), log.L)

	var cfg fsconfig.Config
	if *configPath != "" {
		if _, err := toml.DecodeFile(*configPath, &cfg); err != nil {
			log.G(ctx).WithError(err).Fatalf("config %s", *configPath)
		}
	}

	plain := map[string]bool{}
	for _, h := range strings.Split(*plainHTTP, ",") {
		if h = strings.TrimSpace(h); h != "" {
			plain[h] = true
		}
	}
	client := &http.Client{Transport: http.DefaultTransport}
	hosts := func(ref reference.Spec) ([]docker.RegistryHost, error) {
		host := ref.Hostname()
		scheme := "https"
		if plain[host] {
			scheme = "http"
		}
		return []docker.RegistryHost{{
			Client:       client,
			Host:         host,
			Scheme:       scheme,
			Path:         "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
			Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client)),
		}}, nil
	}

	snRoot := filepath.Join(*root, "snapshotter")
	if err := os.MkdirAll(snRoot, 0o700); err != nil {
		log.G(ctx).WithError(err).Fatal("mkdir root")
	}
	if err := overlayutils.Supported(snRoot); err != nil {
		log.G(ctx).WithError(err).Fatal("overlayfs not usable under the root")
	}
	opaque := layer.OverlayOpaqueTrusted
	if user, err := overlayutils.NeedsUserXAttr(snRoot); err == nil && user {
		opaque = layer.OverlayOpaqueUser
	}
	fs, err := stargzfs.NewFilesystem(filepath.Join(*root, "stargz"), cfg,
		stargzfs.WithGetSources(source.FromDefaultLabels(hosts)),
		stargzfs.WithOverlayOpaqueType(opaque))
	if err != nil {
		log.G(ctx).WithError(err).Fatal("stargz filesystem")
	}
	sn, err := snbase.NewSnapshotter(ctx, snRoot, fs, snbase.AsynchronousRemove)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("snapshotter")
	}

	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		log.G(ctx).WithError(err).Fatal("socket dir")
	}
	_ = os.Remove(*address)
	lis, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatalf("listen %s", *address)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	log.G(ctx).WithField("address", *address).Info("pynydus-stargz serving")

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case s := <-sig:
		log.G(ctx).Infof("%v: stopping", s)
	case err := <-served:
		log.G(ctx).WithError(err).Error("gRPC server ended")
	}
	srv.Stop()
	// Close unmounts every FUSE layer (committed ones too), so nothing outlives us.
	if err := sn.Close(); err != nil {
		log.G(ctx).WithError(err).Warn("close")
	}
	_ = os.Remove(*address)
}
