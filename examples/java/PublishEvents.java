// Publish recstream records with the Java client (kafka-clients), as a shop's JVM service would.
//
//   java -cp '.local/kafka/libs/*' examples/java/PublishEvents.java BOOTSTRAP TOPIC KEY_FIELD < records.jsonl
//
// One JSON record a line on stdin (schemas.Event for recs.clickstream, keyed by user_id; schemas.Product
// for recs.catalogue, keyed by product_id): docs/publishing.md. Delivery as the contract asks: acks=all and
// idempotence, the default partitioner (murmur2 of the key, the one recstream's own producer uses). Prints
// "line partition offset" for every record the broker acknowledged, and exits 1 if any was not.
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.Properties;
import java.util.concurrent.ConcurrentSkipListMap;
import java.util.concurrent.atomic.AtomicInteger;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class PublishEvents {
    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: PublishEvents BOOTSTRAP TOPIC KEY_FIELD < records.jsonl");
            System.exit(2);
        }
        Properties props = new Properties();
        props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        props.put(ProducerConfig.ACKS_CONFIG, "all");
        props.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        props.put(ProducerConfig.LINGER_MS_CONFIG, "5");
        props.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        props.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        ObjectMapper json = new ObjectMapper();
        ConcurrentSkipListMap<Integer, String> acked = new ConcurrentSkipListMap<>();
        AtomicInteger failed = new AtomicInteger();
        int line = 0;
        try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(props);
             BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8))) {
            for (String text; (text = in.readLine()) != null; line++) {
                byte[] key = null;
                try {   // a record that is not JSON is still sent: recstream dead-letters it with the reason
                    JsonNode field = json.readTree(text).path(args[2]);
                    key = field.isTextual() ? field.asText().getBytes(StandardCharsets.UTF_8) : null;
                } catch (Exception notJson) {
                    key = null;
                }
                final int n = line;
                producer.send(new ProducerRecord<>(args[1], key, text.getBytes(StandardCharsets.UTF_8)), (md, err) -> {
                    if (err != null) {
                        failed.incrementAndGet();
                        System.err.println("line " + n + " not acknowledged: " + err);
                    } else {
                        acked.put(n, md.partition() + " " + md.offset());
                    }
                });
            }
            producer.flush();
        }
        acked.forEach((n, where) -> System.out.println(n + " " + where));
        System.exit(failed.get() == 0 ? 0 : 1);
    }
}
