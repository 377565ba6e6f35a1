// Service C of the demo: a Java app (JDK only, one source file) with endpoints to simulate failures.
//
// GET /        answers 200 "Service C | <VERSION> | <host suffix> | <count>",
//              or 500 "Error 500 (Hostname: <host suffix>)" while this replica is crashed.
// GET /crash   switches this replica into crash mode   (answers 200 "crashed").
// GET /repair  switches this replica out of crash mode (answers 200 "repaired").
// GET /health  answers "UP", even while crashed, so that only the mesh reacts to the errors.
//
// <host suffix> is the part of the host name after its last '-' (pod service-c-v2-7d9f-x2k7z -> x2k7z);
// <count> is the number of requests to / this replica has handled, crashed or not.
//
// Environment: PORT (default 8080), VERSION (default v1), HOSTNAME (default: the machine's host name).
// Run with: java ServiceC.java   (the source launcher compiles it in memory, Java 11+).

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;

public class ServiceC {
    private static final AtomicLong COUNT = new AtomicLong();
    private static final AtomicBoolean CRASHED = new AtomicBoolean(false);

    public static void main(String[] args) throws IOException {
        int port = Integer.parseInt(env("PORT", "8080"));
        String version = env("VERSION", "v1");
        String hostSuffix = suffix(hostName());

        HttpServer server = HttpServer.create(new InetSocketAddress(port), 128);
        server.createContext("/", exchange -> {
            try {
                handle(exchange, version, hostSuffix);
            } finally {
                exchange.close();
            }
        });
        ExecutorService pool = Executors.newFixedThreadPool(16);
        server.setExecutor(pool);
        server.start();
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            server.stop(0);
            pool.shutdownNow();
        }));
        System.out.println("service-c " + version + " (" + hostSuffix + ") listening on port " + port);
    }

    private static void handle(HttpExchange exchange, String version, String hostSuffix) throws IOException {
        try (InputStream in = exchange.getRequestBody()) {
            in.readAllBytes();
        }
        String path = exchange.getRequestURI().getPath();
        switch (path) {
            case "/": {
                long count = COUNT.incrementAndGet();
                if (CRASHED.get()) {
                    reply(exchange, 500, "Error 500 (Hostname: " + hostSuffix + ")");
                } else {
                    reply(exchange, 200, "Service C | " + version + " | " + hostSuffix + " | " + count);
                }
                break;
            }
            case "/crash":
                CRASHED.set(true);
                reply(exchange, 200, "crashed");
                break;
            case "/repair":
                CRASHED.set(false);
                reply(exchange, 200, "repaired");
                break;
            case "/health":
                reply(exchange, 200, "UP");
                break;
            default:
                reply(exchange, 404, "Page not found");
        }
    }

    private static void reply(HttpExchange exchange, int status, String text) throws IOException {
        byte[] body = text.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("Content-Type", "text/plain; charset=utf-8");
        if ("HEAD".equals(exchange.getRequestMethod())) {
            exchange.sendResponseHeaders(status, -1);
            return;
        }
        exchange.sendResponseHeaders(status, body.length);
        try (OutputStream out = exchange.getResponseBody()) {
            out.write(body);
        }
    }

    private static String env(String name, String fallback) {
        String value = System.getenv(name);
        return value == null || value.isBlank() ? fallback : value.trim();
    }

    private static String hostName() {
        String name = System.getenv("HOSTNAME");
        if (name != null && !name.isBlank()) {
            return name.trim();
        }
        try {
            return InetAddress.getLocalHost().getHostName();
        } catch (IOException e) {
            return "unknown";
        }
    }

    static String suffix(String host) {
        String shortName = host.split("\\.", 2)[0];
        int dash = shortName.lastIndexOf('-');
        return dash >= 0 && dash < shortName.length() - 1 ? shortName.substring(dash + 1) : shortName;
    }
}
